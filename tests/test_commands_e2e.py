"""End to end: commands go from the REST API over the real broker to a real agent and engine, and back."""
import json
import time
import uuid

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

import fleet_wire as wire
from tests.support.infra import build_busybox_variant
from tests.support.stack import eventually, release_payload, running_stack

pytestmark = pytest.mark.slow

# The containers these tests command are their own, not deployed by Fleet: their agents may act
# on any container (tests/test_local_api_security.py covers the default, Fleet's own only).
ANY_CONTAINER = {"FLEET_COMMANDS_ANY_CONTAINER": "1"}


@pytest.fixture(scope="module")
def command_stack(broker, docker_client, tmp_path_factory):
    """One server, worker and agent for the tests that do not break anything."""
    with running_stack(broker.url, docker_client, tmp_path_factory.mktemp("commands"), extra_env=ANY_CONTAINER) as running:
        yield running


@pytest.fixture(scope="module")
def device(command_stack):
    device = command_stack.create_device("commanded")
    device["agent"] = command_stack.start_agent(device, settle=2.0)
    return device


def execute(stack, device, command, *arg, expect=201, **body):
    response = stack.post(f"/dongle/devices/{device['id']}/execute/", json={"command": command, "arg": list(arg), **body})
    assert response.status_code == expect, response.text
    return response.json()


def finished(stack, device, command, timeout=30):
    """The command once it reached a final state."""
    url = f"/dongle/devices/{device['id']}/execute/{command['id']}/"

    def final():
        body = stack.get(url).json()
        return body if body["state"] in wire.FINAL_COMMAND_STATES else None

    return eventually(final, timeout, 0.05, message=f"command {command['command']} to finish\n{stack.logs()}")


def run(stack, device, command, *arg, **body):
    return finished(stack, device, execute(stack, device, command, *arg, **body))


@pytest.fixture
def chatty_container(docker_client, busybox_image, unique_name):
    """A running container that printed a line to stdout and one to stderr, and ignores SIGTERM."""
    marker = uuid.uuid4().hex
    container = docker_client.containers.run(
        busybox_image, ["sh", "-c", f"echo out-{marker}; echo err-{marker} >&2; exec sleep 3600"],
        name=unique_name("chatty"), detach=True, network_mode="none", labels={"fleet.test.marker": marker},
    )
    eventually(lambda: f"err-{marker}" in container.logs().decode(), 10, message="the container's output")
    return container, marker


# --- commands on a device that is online ---------------------------------------------------

def test_ping_goes_through_the_broker_and_the_result_is_stored(command_stack, device):
    command = execute(command_stack, device, "test.ping")
    assert command["state"] == "queued"
    result = finished(command_stack, device, command)
    assert result["state"] == "succeeded" and result["return"] is True, result
    assert result["published_at"] and result["started_at"] and result["finished_at"] and result["completed_at"]


def test_docker_logs_returns_the_containers_real_output(command_stack, device, chatty_container):
    container, marker = chatty_container
    result = run(command_stack, device, "docker.logs", container.name)
    assert result["state"] == "succeeded", result
    assert f"out-{marker}" in result["return"] and f"err-{marker}" in result["return"]
    tail = run(command_stack, device, "docker.logs", container.name, kwarg={"tail": 1, "timestamps": True})
    (line,) = tail["return"].splitlines()
    assert line.startswith("20") and "Z " in line and marker in line  # one line, with the engine's timestamp


def test_long_output_is_capped_with_a_clear_marker(command_stack, device, docker_client, busybox_image, unique_name):
    container = docker_client.containers.run(
        busybox_image, ["sh", "-c", "yes 0123456789abcdef | head -n 40000; echo last-line; exec sleep 3600"],
        name=unique_name("loud"), detach=True, network_mode="none",
    )
    eventually(lambda: b"last-line" in container.logs(tail=1), 10, message="the output written")
    result = run(command_stack, device, "docker.logs", container.name)
    assert result["state"] == "succeeded" and result["truncated"] is True
    assert result["return"].startswith("[output truncated: showing the last ")
    assert result["return"].rstrip().endswith("last-line") and len(result["return"]) < 300 * 1024


def test_docker_ps_and_inspect_describe_the_real_container(command_stack, device, chatty_container):
    container, marker = chatty_container
    listed = run(command_stack, device, "docker.ps", kwarg={"label": f"fleet.test.marker={marker}"})
    assert [c["name"] for c in listed["return"]] == [container.name] and listed["return"][0]["state"] == "running"
    inspected = run(command_stack, device, "docker.inspect", container.name)
    assert inspected["return"]["Config"]["Labels"]["fleet.test.marker"] == marker


def test_stop_start_and_restart_act_on_the_real_container(command_stack, device, chatty_container):
    container, _ = chatty_container
    stopped = run(command_stack, device, "docker.stop", container.name, kwarg={"timeout": 0})
    assert stopped["return"] == {"name": container.name, "status": "exited"}, stopped
    assert run(command_stack, device, "docker.start", container.name)["return"]["status"] == "running"
    container.reload()
    before = container.attrs["State"]["StartedAt"]
    assert run(command_stack, device, "docker.restart", container.name, kwarg={"timeout": 0})["state"] == "succeeded"
    container.reload()
    assert container.status == "running" and container.attrs["State"]["StartedAt"] != before


def test_unknown_commands_and_bad_arguments_fail_naming_the_problem_and_the_agent_keeps_serving(
    command_stack, device
):
    unknown = run(command_stack, device, "no.such")
    assert unknown["state"] == "failed" and "unknown command 'no.such'" in unknown["error"]
    bad = run(command_stack, device, "docker.logs", kwarg={"tail": 5})
    assert bad["state"] == "failed" and "missing a required argument: 'name'" in bad["error"]
    missing = run(command_stack, device, "docker.logs", f"absent-{uuid.uuid4().hex[:6]}")
    assert missing["state"] == "failed" and "no container named" in missing["error"]
    assert run(command_stack, device, "test.ping")["state"] == "succeeded"


def test_grains_describe_the_agent_the_os_and_the_engine(command_stack, device, docker_client):
    grains = run(command_stack, device, "grains.items")["return"]
    assert grains["unit_id"] == device["unit_id"] and grains["agent_version"]
    assert grains["engine"]["version"] == docker_client.version()["Version"]
    assert grains["os"]["kernel"] and isinstance(grains["releases"], dict)


def test_last_logs_returns_the_agents_own_recent_lines(command_stack, device):
    ping = run(command_stack, device, "test.ping")
    lines = run(command_stack, device, "minionutil.last_logs", kwarg={"num": 50})["return"]
    assert len(lines) <= 50 and any(f"command={ping['id']}" in line for line in lines)
    warnings = run(command_stack, device, "minionutil.last_logs", kwarg={"level": "warning"})["return"]
    assert all(" INFO " not in line and " DEBUG " not in line for line in warnings)


def test_a_command_still_running_after_its_timeout_is_timed_out_and_the_agent_keeps_serving(
    command_stack, device, chatty_container
):
    container, _ = chatty_container  # its sleep ignores SIGTERM: stopping it takes the whole stop timeout
    slow = run(command_stack, device, "docker.stop", container.name, kwarg={"timeout": 5}, timeout=0.5)
    assert slow["state"] == "timed_out" and "0.5 s" in slow["error"], slow
    assert run(command_stack, device, "test.ping")["state"] == "succeeded"


def test_state_sls_deploys_the_queued_release_while_other_commands_keep_running(
    command_stack, device, docker_client, unique_name
):
    reference = unique_name.image("workload", tag="v1")
    build_busybox_variant(docker_client, reference, cmd=["sleep", "3600"])
    project = command_stack.post("/docker/projects/", json={"name": "commanded"}).json()
    name = f"app{uuid.uuid4().hex[:8]}"
    release = command_stack.post(f"/docker/projects/{project['id']}/releases/",
                                 json=release_payload([device["id"]], *reference.rsplit(":", 1), name=name)).json()
    queued = device["agent"].state_dir / "projects" / str(project["id"]) / "queued.json"
    eventually(queued.exists, 20, message="the release in the agent's queue")

    deploy = execute(command_stack, device, "state.sls", "docker.release")
    eventually(lambda: command_stack.get(f"/dongle/devices/{device['id']}/execute/{deploy['id']}/").json()["state"]
               == "running", 10, 0.05, message="the deploy reported running")
    ping = run(command_stack, device, "test.ping")
    deployed = finished(command_stack, device, deploy)
    assert ping["completed_at"] < deployed["completed_at"], "the ping waited for the deploy"
    assert deployed["state"] == "succeeded", deployed
    (outcome,) = deployed["return"]
    assert (outcome["project_id"], outcome["release_id"], outcome["state"]) == (project["id"], release["id"], "succeeded")
    assert docker_client.containers.get(f"deployment-{name}-{project['id']}").status == "running"


# --- delivery faults --------------------------------------------------------------------------

def _publish_raw(broker, topic, payload, properties=None):
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_a_command_delivered_twice_runs_once_even_across_an_agent_restart(
    command_stack, broker, docker_client, busybox_image, unique_name, tmp_path
):
    starts = tmp_path / "starts"
    starts.mkdir()
    container = docker_client.containers.run(
        busybox_image, ["sh", "-c", "echo started >> /data/starts; exec sleep 3600"], name=unique_name("counted"),
        detach=True, network_mode="none", volumes=[f"{starts}:/data"],
    )
    eventually(lambda: (starts / "starts").exists(), 10, message="the first start")
    device = command_stack.create_device("twice")
    agent = command_stack.start_agent(device)
    command = execute(command_stack, device, "docker.restart", container.name, kwarg={"timeout": 0})
    assert finished(command_stack, device, command)["state"] == "succeeded"

    # What QoS 1 may do: the very same message again, now and after the agent restarted.
    stored = command_stack.get(f"/dongle/devices/{device['id']}/execute/{command['id']}/").json()
    duplicate = wire.encode(wire.from_builtins(wire.CommandMessage, {
        "id": command["id"], "command": "docker.restart", "arg": [container.name], "kwarg": {"timeout": 0},
        "timeout": None, "deadline": time.time() + 600,
    }))
    topic = wire.device_topic(device["unit_id"], "commands")
    _publish_raw(broker, topic, duplicate)
    eventually(lambda: "delivered again" in agent.process.log(), 10, message="the duplicate noticed")
    agent.process.stop()
    restarted = command_stack.start_agent(device, state_dir=agent.state_dir)
    _publish_raw(broker, topic, duplicate)
    eventually(lambda: "delivered again" in restarted.process.log(), 10, message="the duplicate noticed after restart")
    assert (starts / "starts").read_text().splitlines() == ["started", "started"]
    after = command_stack.get(f"/dongle/devices/{device['id']}/execute/{command['id']}/").json()
    assert after["completed_at"] == stored["completed_at"]


def test_a_command_for_a_device_offline_past_its_ttl_expires_and_is_never_run(command_stack, device):
    sleeper = command_stack.create_device("asleep")
    agent = command_stack.start_agent(sleeper)  # connects once, so the broker keeps its session
    eventually(lambda: "connected" in agent.process.log(), 10, message="the agent's first connection")
    agent.process.stop()

    doomed = execute(command_stack, sleeper, "test.ping", ttl=1)
    kept = execute(command_stack, sleeper, "test.ping", ttl=600)
    expired = finished(command_stack, sleeper, doomed, timeout=15)
    assert expired["state"] == "expired" and "TTL" in expired["error"]

    awake = command_stack.start_agent(sleeper, state_dir=agent.state_dir)
    assert finished(command_stack, sleeper, kept)["state"] == "succeeded"
    time.sleep(0.5)
    # The broker may still hand the expired message over; the agent must refuse it unrun.
    mentions = [line for line in awake.process.log().splitlines() if doomed["id"] in line]
    assert all(line.endswith(("accepted", "state=expired")) for line in mentions), mentions
    assert command_stack.get(f"/dongle/devices/{sleeper['id']}/execute/{doomed['id']}/").json()["state"] == "expired"


def test_results_published_while_every_worker_is_down_are_stored_when_it_returns(command_stack, device):
    worker = next(p for p in command_stack.processes if "worker" in p.args)
    worker_id = worker.args[worker.args.index("--worker-id") + 1]
    worker.stop()
    command_stack.processes.remove(worker)
    try:
        command = execute(command_stack, device, "test.ping")
        eventually(lambda: f"command={command['id']} name=test.ping state=succeeded" in device["agent"].process.log(),
                   10, message="the agent to run the command")
        time.sleep(0.5)
        url = f"/dongle/devices/{device['id']}/execute/{command['id']}/"
        assert command_stack.get(url).json()["state"] == "queued"
    finally:
        command_stack.start_worker(worker_id)
    assert finished(command_stack, device, command)["state"] == "succeeded"


def test_a_result_survives_the_agent_dying_before_the_broker_took_it(
    restartable_broker, docker_client, chatty_container, tmp_path
):
    container, _ = chatty_container
    with running_stack(restartable_broker.url, docker_client, tmp_path, extra_env=ANY_CONTAINER) as stack:
        device = stack.create_device("fragile")
        agent = stack.start_agent(device)
        # The container ignores SIGTERM, so this takes the whole 3 s: time to pull the broker away.
        command = execute(stack, device, "docker.stop", container.name, kwarg={"timeout": 3})
        eventually(lambda: f"command={command['id']} name=docker.stop accepted" in agent.process.log(), 10,
                   message="the agent to start the command")
        restartable_broker.stop()
        eventually(lambda: f"command={command['id']} name=docker.stop state=succeeded" in agent.process.log(), 15,
                   message="the command to finish while the broker is away")
        agent.process.kill()
        restartable_broker.start()
        restarted = stack.start_agent(device, state_dir=agent.state_dir)
        result = finished(stack, device, command, timeout=60)
        assert result["state"] == "succeeded" and result["return"]["status"] == "exited", result
        assert f"command={command['id']} resending" in restarted.process.log()


def test_a_command_posted_while_the_broker_is_down_is_sent_by_the_sweep_when_it_returns(
    restartable_broker, docker_client, tmp_path
):
    with running_stack(restartable_broker.url, docker_client, tmp_path) as stack:
        device = stack.create_device("patient")
        stack.start_agent(device)
        restartable_broker.stop()
        command = execute(stack, device, "test.ping")
        assert command["state"] == "queued" and command["published_at"] is None
        restartable_broker.start()
        result = finished(stack, device, command, timeout=60)
        assert result["state"] == "succeeded" and result["published_at"], result


# --- the local API on the device ----------------------------------------------------------------

def test_the_local_api_names_the_device_and_writes_its_unit_id_file(device):
    agent = device["agent"]
    assert requests.get(agent.api_url + "/", timeout=10).json() == {"unit_id": device["unit_id"]}
    assert (agent.state_dir / "minion_id").read_text().strip() == device["unit_id"]


def test_the_local_api_runs_a_command_synchronously(device, chatty_container):
    container, marker = chatty_container
    url = f"{device['agent'].api_url}/dongle/{device['unit_id']}/execute/"
    response = requests.post(url, json={"command": "docker.logs", "arg": [container.name], "kwarg": {}}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "succeeded" and f"out-{marker}" in body["return"]
    unknown = requests.post(url, json={"command": "no.such"}, timeout=30).json()
    assert unknown["state"] == "failed" and "unknown command" in unknown["error"]


@pytest.mark.parametrize("body, field", [
    ({}, "command"), ({"command": "docker.logs", "arg": "web"}, "arg"),
    ({"command": "docker.logs", "kwarg": []}, "kwarg"), ({"command": "test.ping", "timeout": -1}, "timeout"),
    ({"command": "test.ping", "colour": "red"}, "colour"),
])
def test_the_local_api_answers_bad_bodies_with_400_naming_the_field(device, body, field):
    url = f"{device['agent'].api_url}/dongle/{device['unit_id']}/execute/"
    response = requests.post(url, json=body, timeout=10)
    assert response.status_code == 400 and field in response.json()["errors"], response.text


def test_the_local_api_refuses_a_request_meant_for_another_device(device):
    response = requests.post(f"{device['agent'].api_url}/dongle/{uuid.uuid4()}/execute/",
                             json={"command": "test.ping"}, timeout=10)
    assert response.status_code == 401
