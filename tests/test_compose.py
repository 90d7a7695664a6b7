"""docker-compose.yml as users run it: the whole stack in containers deploys a release to the demo device."""
import json
import uuid

import docker
import pytest
import requests

from tests.support.compose import ComposeProject, compose_environment, ensure_base_image
from tests.support.infra import build_busybox_variant, free_port
from tests.support.stack import eventually, release_payload, remove_agent_containers

pytestmark = pytest.mark.slow


def _healthy(url) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def compose_stack(docker_client):
    """The compose stack (two ingest workers and the demo device) up on free loopback ports; down -v afterwards."""
    unit_id = str(uuid.uuid4())
    http_port, broker_port = free_port(), free_port()
    env = compose_environment(
        ensure_base_image(docker_client),
        FLEET_HTTP_PORT=http_port, FLEET_BROKER_PORT=broker_port, FLEET_DEMO_UNIT_ID=unit_id,
        FLEET_SETTLE_SECONDS=1, FLEET_WEB_WORKERS=2, POSTGRES_PASSWORD=uuid.uuid4().hex,
    )
    project = ComposeProject(f"fleet-test-compose-{uuid.uuid4().hex[:8]}", env)
    project.build(docker_client)
    try:
        project.run("up", "-d", "--scale", "worker=2")
        api = f"http://127.0.0.1:{http_port}"
        eventually(lambda: _healthy(api + "/health"), 120, interval=1, message="the api container's /health")
        yield project, api, unit_id
    finally:
        print(project.logs())
        project.run("down", "-v", "--remove-orphans", "-t", "5", check=False)
        remove_agent_containers(docker_client, [unit_id])


def test_the_compose_stack_deploys_a_release_to_its_demo_device(compose_stack, docker_client, unique_name):
    project, api, unit_id = compose_stack
    token = project.run("exec", "-T", "api", "fleet-server", "tokens", "create", "--name", "compose test")
    headers = {"Authorization": f"APIToken {token.stdout.strip().splitlines()[-1]}"}
    device = requests.post(api + "/dongle/devices/", json={"name": "demo", "unit_id": unit_id}, headers=headers,
                           timeout=30)
    assert device.status_code == 201, device.text
    workload = unique_name.image("workload", tag="v1")
    build_busybox_variant(docker_client, workload, cmd=["sleep", "3600"])
    fleet_project = requests.post(api + "/docker/projects/", json={"name": "compose"}, headers=headers, timeout=30)
    assert fleet_project.status_code == 201, fleet_project.text
    project_id = fleet_project.json()["id"]
    body = release_payload([device.json()["id"]], *workload.rsplit(":", 1), name=f"app{uuid.uuid4().hex[:6]}")
    release = requests.post(f"{api}/docker/projects/{project_id}/releases/", json=body, headers=headers, timeout=30)
    assert release.status_code == 201, release.text

    def queued():
        listing = project.run("exec", "-T", "device", "ls", f"/var/lib/fleet-device/projects/{project_id}", check=False)
        return "queued.json" in listing.stdout

    eventually(queued, 60, interval=1, message="the release in the demo device's queue")
    slept = project.run("exec", "-T", "device", "fleet-device", "sleep", "--budget", "120")
    outcome = json.loads(slept.stdout)["return"][0]
    assert outcome["state"] == "succeeded", slept.stdout

    fqn = release.json()["containers"][0]["fully_qualified_name"]
    assert docker_client.containers.get(fqn).status == "running"
    release_url = f"{api}/docker/projects/{project_id}/releases/{release.json()['id']}/"
    eventually(lambda: requests.get(release_url, headers=headers, timeout=10).json()["successful_deployments"]
               == [device.json()["id"]], 60, interval=1, message="successful_deployments to list the demo device")
    workers = project.run("ps", "-q", "worker").stdout.split()
    assert len(workers) == 2
