"""End to end on PostgreSQL: gunicorn and the ingest worker on a real PostgreSQL server, a real agent and engine."""
import json
import uuid

import pytest

from tests.support.infra import build_busybox_variant
from tests.support.stack import eventually, release_payload

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_a_release_is_deployed_and_reported_with_the_server_on_postgresql(stack, docker_client, unique_name):
    assert stack.env["FLEET_DATABASE_URL"].startswith("postgresql")
    reference = build_busybox_variant(docker_client, unique_name.image("workload", tag="v1"), cmd=["sleep", "3600"])
    device = stack.create_device("pg-dongle")
    agent = stack.start_agent(device)
    project = stack.post("/docker/projects/", json={"name": "pg"}).json()
    name = f"app{uuid.uuid4().hex[:8]}"
    created = stack.post(f"/docker/projects/{project['id']}/releases/",
                         json=release_payload([device["id"]], *reference.rsplit(":", 1), name=name))
    assert created.status_code == 201, created.text
    release = created.json()

    eventually(lambda: (agent.state_dir / "projects" / str(project["id"]) / "queued.json").exists(), 20,
               message="the release in the agent's queue")
    slept = agent.sleep()
    assert json.loads(slept.stdout)["return"][0]["state"] == "succeeded", slept.stdout + stack.logs()
    assert docker_client.containers.get(release["containers"][0]["fully_qualified_name"]).status == "running"
    eventually(lambda: stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [release["id"]],
               20, message="the worker to record the deployment in PostgreSQL")
