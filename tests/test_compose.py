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


def _healthy(url, verify) -> bool:
    try:
        return requests.get(url, timeout=2, verify=verify).status_code == 200
    except requests.RequestException:
        return False


def _proxy_certificate(project, path) -> str | None:
    """The proxy's self-signed certificate, written to `path` for clients to verify it with (None until made)."""
    shown = project.run("exec", "-T", "proxy", "cat", "/var/lib/fleet-proxy/tls/cert.pem", check=False)
    if "BEGIN CERTIFICATE" not in shown.stdout:
        return None
    path.write_text(shown.stdout)
    return str(path)


class HttpsApi:
    """requests to the stack's API through its TLS proxy, verified against the proxy's certificate."""

    def __init__(self, url: str, certificate: str):
        self.url, self.certificate = url, certificate

    def request(self, method, path, **kwargs):
        return requests.request(method, self.url + path, verify=self.certificate, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)


@pytest.fixture(scope="module")
def compose_stack(docker_client, tmp_path_factory):
    """The compose stack (two ingest workers and the demo device) up on free loopback ports; down -v afterwards.

    The API is reached as users reach it: through the proxy, over HTTPS.
    """
    unit_id = str(uuid.uuid4())
    https_port, broker_port = free_port(), free_port()
    env = compose_environment(
        ensure_base_image(docker_client),
        FLEET_HTTPS_PORT=https_port, FLEET_BROKER_PORT=broker_port, FLEET_DEMO_UNIT_ID=unit_id,
        FLEET_SETTLE_SECONDS=1, FLEET_WEB_WORKERS=2, POSTGRES_PASSWORD=uuid.uuid4().hex,
        FLEET_MAX_REQUEST_BYTES=64 * 1024,
    )
    project = ComposeProject(f"fleet-test-compose-{uuid.uuid4().hex[:8]}", env)
    project.build(docker_client)
    try:
        project.run("up", "-d", "--scale", "worker=2")
        certificate = eventually(lambda: _proxy_certificate(project, tmp_path_factory.mktemp("proxy") / "proxy.pem"), 180, interval=2,
                                 message="the proxy's certificate")
        api = HttpsApi(f"https://127.0.0.1:{https_port}", certificate)
        eventually(lambda: _healthy(api.url + "/health", certificate), 120, interval=1,
                   message="/health through the proxy")
        yield project, api, unit_id
    finally:
        print(project.logs())
        project.run("down", "-v", "--remove-orphans", "-t", "5", check=False)
        remove_agent_containers(docker_client, [unit_id])


def test_the_compose_stack_deploys_a_release_to_its_demo_device(compose_stack, docker_client, unique_name):
    project, api, unit_id = compose_stack
    token = project.run("exec", "-T", "api", "fleet-server", "tokens", "create", "--name", "compose test")
    headers = {"Authorization": f"APIToken {token.stdout.strip().splitlines()[-1]}"}
    device = api.post("/dongle/devices/", json={"name": "demo", "unit_id": unit_id}, headers=headers, timeout=30)
    assert device.status_code == 201, device.text
    workload = unique_name.image("workload", tag="v1")
    build_busybox_variant(docker_client, workload, cmd=["sleep", "3600"])
    fleet_project = api.post("/docker/projects/", json={"name": "compose"}, headers=headers, timeout=30)
    assert fleet_project.status_code == 201, fleet_project.text
    project_id = fleet_project.json()["id"]
    body = release_payload([device.json()["id"]], *workload.rsplit(":", 1), name=f"app{uuid.uuid4().hex[:6]}")
    release = api.post(f"/docker/projects/{project_id}/releases/", json=body, headers=headers, timeout=30)
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
    release_url = f"/docker/projects/{project_id}/releases/{release.json()['id']}/"
    eventually(lambda: api.get(release_url, headers=headers, timeout=10).json()["successful_deployments"]
               == [device.json()["id"]], 60, interval=1, message="successful_deployments to list the demo device")
    workers = project.run("ps", "-q", "worker").stdout.split()
    assert len(workers) == 2


def test_the_proxy_serves_the_api_over_https_only_and_enforces_the_body_cap(compose_stack):
    project, api, _unit_id = compose_stack
    token = project.run("exec", "-T", "api", "fleet-server", "tokens", "create", "--name", "compose test")
    headers = {"Authorization": f"APIToken {token.stdout.strip().splitlines()[-1]}"}
    assert api.get("/docker/projects/", headers=headers, timeout=10).status_code == 200
    # Plain HTTP on the TLS port is not served.
    plain = requests.get(api.url.replace("https://", "http://") + "/health", timeout=10)
    assert plain.status_code == 400
    # The proxy refuses a body over the cap itself, in the API's error shape.
    too_big = api.post("/docker/projects/", data=b"x" * (64 * 1024 + 1), timeout=10,
                       headers={**headers, "Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["code"] == 413
    # The API's port is not published: the only way in is the proxy.
    assert project.run("port", "api", "8000", check=False).stdout.strip() in ("", ":0")


def test_the_demo_device_image_holds_the_agent_without_the_server(compose_stack):
    project, _api, _unit_id = compose_stack
    assert project.run("exec", "-T", "device", "python3", "-c", "import fleet_device.agent").returncode == 0
    for module in ("fleet_server", "flask", "sqlalchemy"):
        imported = project.run("exec", "-T", "device", "python3", "-c", f"import {module}", check=False)
        assert "ModuleNotFoundError" in imported.stderr, module
    served = project.run("exec", "-T", "device", "fleet-server", "--help", check=False)
    assert served.returncode == 1 and "needs the server extra" in served.stderr, served.stderr


def test_the_api_image_holds_the_server_without_the_agent(compose_stack):
    project, _api, _unit_id = compose_stack
    assert project.run("exec", "-T", "api", "python3", "-c", "import fleet_server.app").returncode == 0
    for module in ("fleet_device", "docker"):
        imported = project.run("exec", "-T", "api", "python3", "-c", f"import {module}", check=False)
        assert "ModuleNotFoundError" in imported.stderr, module
