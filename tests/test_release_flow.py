"""End to end: a release goes from the REST API over the real broker to the real Docker engine and back."""
import json
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

import fleet_wire as wire
from tests.support.infra import build_busybox_variant
from tests.support.stack import eventually, release_payload

pytestmark = pytest.mark.slow


@pytest.fixture
def workload(docker_client, unique_name):
    """A busybox image whose default command keeps running."""
    reference = unique_name.image("workload", tag="v1")
    build_busybox_variant(docker_client, reference, cmd=["sleep", "3600"])
    repository, tag = reference.rsplit(":", 1)
    return repository, tag


def _create_project(stack):
    response = stack.post("/docker/projects/", json={"name": f"demo-{uuid.uuid4().hex[:6]}"})
    assert response.status_code == 201, response.text
    return response.json()


def _container_name():
    return f"app{uuid.uuid4().hex[:8]}"


def _queued(agent, project_id):
    return (agent.state_dir / "projects" / str(project_id) / "queued.json").exists()


def test_a_release_reaches_a_running_container_after_the_sleep_trigger(stack, workload, docker_client, tmp_path):
    device = stack.create_device("dongle")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # The release binds a directory of the test's own: the device is told it may (the server's token is an admin's).
    agent = stack.start_agent(device, extra_args=["--allowed-bind-roots", str(tmp_path)])
    project = _create_project(stack)
    image, tag = workload
    name = _container_name()
    body = release_payload(
        [device["id"]], image, tag, name=name,
        startup_parameters={
            "environment": "GREETING='hello world' MODE=demo",
            "binds": [f"{data_dir}:/data:rw"],
            "network_mode": "none",
            "restart_policy": "always",
            "privileged": False,
        },
    )

    created = stack.post(f"/docker/projects/{project['id']}/releases/", json=body)
    assert created.status_code == 201, created.text
    release = created.json()
    assert len(release["version_hash"]) == 8
    assert release["containers"][0]["fully_qualified_name"] == f"deployment-{name}-{project['id']}"
    assert release["successful_deployments"] == []

    eventually(lambda: _queued(agent, project["id"]), 20, message="the release in the agent's queue")
    slept = agent.sleep()
    assert slept.returncode == 0, slept.stderr + stack.logs()
    assert json.loads(slept.stdout)["return"][0]["state"] == "succeeded", slept.stdout + stack.logs()

    container = docker_client.containers.get(release["containers"][0]["fully_qualified_name"])
    assert container.status == "running"
    config = container.attrs["Config"]
    assert "GREETING=hello world" in config["Env"] and "MODE=demo" in config["Env"]
    assert config["Labels"]["fleet.project"] == str(project["id"])
    assert config["Labels"]["fleet.release"] == str(release["id"])
    assert config["Labels"]["fleet.version_hash"] == release["version_hash"]
    host_config = container.attrs["HostConfig"]
    assert host_config["Binds"] == [f"{data_dir}:/data:rw"]
    assert host_config["NetworkMode"] == "none"
    assert host_config["RestartPolicy"]["Name"] == "always"

    release_url = f"/docker/projects/{project['id']}/releases/{release['id']}/"
    eventually(lambda: stack.get(release_url).json()["successful_deployments"] == [device["id"]], 20,
               message="successful_deployments to list the device")
    assert stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [release["id"]]


def test_a_device_offline_when_the_release_was_published_gets_it_when_it_connects(stack, workload, docker_client):
    device = stack.create_device("asleep")
    project = _create_project(stack)
    image, tag = workload
    created = stack.post(
        f"/docker/projects/{project['id']}/releases/",
        json=release_payload([device["id"]], image, tag, name=_container_name()),
    )
    assert created.status_code == 201, created.text

    agent = stack.start_agent(device)
    eventually(lambda: _queued(agent, project["id"]), 20, message="the retained release to reach the agent")
    assert agent.sleep().returncode == 0
    fqn = created.json()["containers"][0]["fully_qualified_name"]
    assert docker_client.containers.get(fqn).status == "running"
    eventually(lambda: stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [created.json()["id"]],
               20, message="docker_releases to list the release")


def test_a_new_release_replaces_the_previous_one_in_place(stack, workload, docker_client, unique_name):
    device = stack.create_device()
    agent = stack.start_agent(device)
    project = _create_project(stack)
    image, tag = workload
    name = _container_name()
    first = stack.post(f"/docker/projects/{project['id']}/releases/",
                       json=release_payload([device["id"]], image, tag, name=name)).json()
    eventually(lambda: _queued(agent, project["id"]), 20, message="first release queued")
    assert agent.sleep().returncode == 0

    v2 = unique_name.image("workload", tag="v2")
    build_busybox_variant(docker_client, v2, cmd=["sleep", "3600"])
    body = release_payload([device["id"]], *v2.rsplit(":", 1), name=name)
    body["version"] = "2.0.0"
    second = stack.post(f"/docker/projects/{project['id']}/releases/", json=body).json()
    eventually(lambda: _queued(agent, project["id"]), 20, message="second release queued")
    assert agent.sleep().returncode == 0

    owned = docker_client.containers.list(all=True, filters={"label": f"fleet.unit_id={device['unit_id']}"})
    assert [c.name for c in owned] == [f"deployment-{name}-{project['id']}"]
    assert owned[0].labels["fleet.release"] == str(second["id"])
    eventually(lambda: stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [second["id"]],
               20, message="docker_releases to show only the second release")
    first_now = stack.get(f"/docker/projects/{project['id']}/releases/{first['id']}/").json()
    assert first_now["successful_deployments"] == []


def test_a_container_that_exits_is_reported_failed_and_the_old_one_keeps_running(
    stack, workload, docker_client, unique_name
):
    device = stack.create_device()
    agent = stack.start_agent(device)
    project = _create_project(stack)
    image, tag = workload
    name = _container_name()
    stack.post(f"/docker/projects/{project['id']}/releases/", json=release_payload([device["id"]], image, tag, name=name))
    eventually(lambda: _queued(agent, project["id"]), 20, message="first release queued")
    assert agent.sleep().returncode == 0

    broken = unique_name.image("broken", tag="v1")
    build_busybox_variant(docker_client, broken, cmd=["false"])
    body = release_payload([device["id"]], *broken.rsplit(":", 1), name=name)
    body["version"] = "2.0.0"
    stack.post(f"/docker/projects/{project['id']}/releases/", json=body)
    eventually(lambda: _queued(agent, project["id"]), 20, message="broken release queued")
    slept = agent.sleep()
    outcome = json.loads(slept.stdout)["return"][0]
    assert outcome["state"] == "failed" and outcome["step"] == "verify", outcome

    fqn = f"deployment-{name}-{project['id']}"
    container = docker_client.containers.get(fqn)
    assert container.status == "running"
    assert container.image.tags == [f"{image}:{tag}"]


def _publish_raw(broker, topic, payload):
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_malformed_mqtt_payloads_are_dropped_and_agent_and_worker_keep_serving(stack, broker, workload, docker_client):
    device = stack.create_device()
    agent = stack.start_agent(device)
    project = _create_project(stack)
    garbage = [b"not json", b"[]", b"\xff\xfe\x00", b'{"v": 99}', b'{"v": 1, "project_id": "x"}',
               b"[" * 5000, json.dumps({"v": 1, "project_id": project["id"], "release": {"id": "nope"}}).encode()]
    for payload in garbage:
        _publish_raw(broker, wire.release_topic(device["unit_id"], project["id"]), payload)
        _publish_raw(broker, wire.device_topic(device["unit_id"], "deployments"), payload)
        _publish_raw(broker, wire.device_topic(device["unit_id"], "status"), payload)
    eventually(lambda: agent.process.log().count("rejected message") >= len(garbage), 20,
               message="the agent to reject every malformed release message")

    image, tag = workload
    created = stack.post(f"/docker/projects/{project['id']}/releases/",
                         json=release_payload([device["id"]], image, tag, name=_container_name()))
    eventually(lambda: _queued(agent, project["id"]), 20, message="a real release after the garbage")
    assert agent.process.popen.poll() is None
    assert json.loads(agent.sleep().stdout)["return"][0]["state"] == "succeeded"
    eventually(lambda: stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [created.json()["id"]],
               20, message="the worker to record the real report")
    worker_log = "".join(p.log() for p in stack.processes if "worker" in p.log_path.name)
    assert worker_log.count("rejected device message") >= 2 * len(garbage) - 2
