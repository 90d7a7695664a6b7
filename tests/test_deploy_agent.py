"""The agent process with the deploy engine: real broker, real engine, real registry, SIGKILL and the sleep trigger."""
import json
import os
import signal
import stat
import subprocess
import uuid

import pytest

import fleet_wire as wire
from tests.support.deploy import message, owned_containers, release, spec, workload
from tests.support.infra import close_mqtt, connect_mqtt, free_port, subscribe_and_wait
from tests.support.stack import Process, _answers, _command, eventually, remove_agent_containers

pytestmark = pytest.mark.slow


class Device:
    """One device: an agent process (restartable) on the session broker, and what it reports."""

    def __init__(self, broker, tmp_path, docker_client):
        self.broker, self.tmp = broker, tmp_path
        self.unit_id = str(uuid.uuid4())
        self.state_dir = tmp_path / "state"
        self.reports, self.topics, self.process = [], set(), None
        self.docker = docker_client
        self.listener, _ = connect_mqtt(broker.host, broker.port, on_message=lambda c, u, m: self.reports.append(
            json.loads(m.payload)))
        subscribe_and_wait(self.listener, wire.device_topic(self.unit_id, "deployments"))
        self.publisher, _ = connect_mqtt(broker.host, broker.port)

    def start(self, settle=0.3):
        self.api = f"127.0.0.1:{free_port()}"
        args = _command("fleet-device") + [
            "run", "--unit-id", self.unit_id, "--broker", self.broker.url, "--state-dir", str(self.state_dir),
            "--api", self.api, "--minion-id-file", str(self.state_dir / "minion_id"), "--settle", str(settle)]
        self.process = Process(args, {**os.environ, "FLEET_LOG_LEVEL": "DEBUG"},
                               self.tmp / "agent.log").start()
        eventually(lambda: _answers(f"http://{self.api}/"), 20, message="the agent's local API")

    def publish(self, project_id, doc, registries=()):
        topic = wire.release_topic(self.unit_id, project_id)
        self.topics.add(topic)
        payload = wire.encode(wire.from_builtins(wire.ReleaseMessage, {"project_id": project_id, "release": doc,
                                                     "registries": list(registries)}))
        self.publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def queued(self, project_id):
        path = self.state_dir / "projects" / str(project_id) / "queued.json"
        return path.exists() and json.loads(path.read_text())["release"]

    def sleep(self, budget=60, background=False):
        args = _command("fleet-device") + ["sleep", "--api", self.api, "--budget", str(budget), "--grace", "60"]
        if background:
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return subprocess.run(args, capture_output=True, text=True, timeout=budget + 90)

    def states(self, release_id):
        return [r["state"] for r in self.reports if r["release_id"] == release_id]

    def close(self):
        if self.process:
            self.process.stop()
        for topic in self.topics:  # clear the retained releases on the shared broker
            self.publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        close_mqtt(self.publisher)
        close_mqtt(self.listener)
        remove_agent_containers(self.docker, [self.unit_id])


@pytest.fixture
def device(broker, tmp_path, docker_client):
    running = Device(broker, tmp_path, docker_client)
    yield running
    running.close()


def outcomes(completed):
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return [(o["project_id"], o["release_id"], o["state"]) for o in json.loads(completed.stdout)["return"]]


def test_an_agent_killed_mid_deploy_rolls_back_on_restart_and_deploys_at_the_next_sleep(
    device, docker_client, unique_name
):
    name = unique_name("svc")
    v1 = release(1, spec(name, workload(docker_client, unique_name, tag="v1")))
    v2 = release(2, spec(name, workload(docker_client, unique_name, "two", tag="v2")))
    device.start()
    device.publish(3, v1)
    eventually(lambda: device.queued(3), 20, message="release 1 queued")
    assert outcomes(device.sleep()) == [(3, 1, "succeeded")]
    device.process.stop()

    device.start(settle=120)  # verification lasts long enough to kill the agent during it
    device.publish(3, v2)
    eventually(lambda: device.queued(3), 20, message="release 2 queued")
    trigger = device.sleep(background=True)
    eventually(lambda: "verifying" in device.states(2), 30, message="release 2 being verified")
    device.process.stop(signal.SIGKILL)
    trigger.wait(30)
    assert trigger.returncode == 1  # the agent vanished mid-deploy: not a moment to sleep
    assert {c.labels["fleet.release"] for c in owned_containers(docker_client, device.unit_id).values()} == {"1", "2"}

    device.start()
    eventually(lambda: "rolled_back" in device.states(2), 30, message="the rollback report")
    rolled_back = [r for r in device.reports if r["state"] == "rolled_back"][0]
    assert rolled_back["step"] == "verify" and "agent stopped" in rolled_back["detail"]
    owned = owned_containers(docker_client, device.unit_id)
    assert list(owned) == [name] and owned[name].labels["fleet.release"] == "1" and owned[name].status == "running"

    # The retained release comes back with the session and is applied at the next sleep.
    eventually(lambda: device.queued(3), 20, message="release 2 queued again")
    assert outcomes(device.sleep()) == [(3, 2, "succeeded")]
    assert [c.labels["fleet.release"] for c in owned_containers(docker_client, device.unit_id).values()] == ["2"]


def test_a_private_registry_release_is_pulled_and_the_agent_logs_in_again_at_start_up(
    device, docker_client, registry, unique_name
):
    local = workload(docker_client, unique_name, "private")
    repository = local.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    registry.push(docker_client, local, repository, "v1")
    docker_client.images.remove(registry.ref(repository, "v1"))
    credentials = {"id": 9, "url": f"http://{registry.url}", "username": registry.username,
                   "password": registry.password}
    name = unique_name("private")
    device.start()

    device.publish(4, release(1, {**spec(name, f"{repository}:v1"), "registry": 9}), [credentials])
    eventually(lambda: device.queued(4), 20, message="the release queued")
    assert outcomes(device.sleep()) == [(4, 1, "succeeded")]
    assert docker_client.containers.get(name).attrs["Config"]["Image"] == registry.ref(repository, "v1")
    stored = device.state_dir / "registries.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600 and json.loads(stored.read_text()) == [credentials]

    device.process.stop()
    device.start()
    eventually(lambda: f"logged in to registry {registry.url}" in device.process.log(), 20,
               message="the start-up login")


def test_the_sleep_budget_starts_no_deploy_once_spent_and_the_newest_queued_release_wins(
    device, docker_client, unique_name
):
    image = workload(docker_client, unique_name)
    first, second = unique_name("first"), unique_name("second")
    device.start(settle=2)
    device.publish(5, release(1, spec(first, image)))
    device.publish(6, release(2, spec(second, image)))
    device.publish(6, release(3, spec(second, image)))  # replaces release 2 before it was applied
    eventually(lambda: device.queued(5) and (device.queued(6) or {}).get("id") == 3, 20,
               message="both projects queued, project 6 with release 3")

    assert outcomes(device.sleep(budget=1)) == [(5, 1, "succeeded"), (6, 3, "queued")]
    assert list(owned_containers(docker_client, device.unit_id)) == [first]

    assert outcomes(device.sleep(budget=60)) == [(6, 3, "succeeded")]
    assert device.states(2) == ["queued"]  # queued, then superseded: never applied
    assert outcomes(device.sleep()) == []


def test_a_release_stays_queued_when_the_engine_does_not_answer(tmp_path):
    import docker

    from fleet_device.agent import Agent, AgentConfig
    from fleet_device.deploy import Deployer

    unit_id = str(uuid.uuid4())
    absent = docker.DockerClient(base_url=f"unix://{tmp_path}/no-engine.sock", version="1.41", timeout=5)
    config = AgentConfig(unit_id=unit_id, state_dir=tmp_path / "state", minion_id_file=None)
    agent = Agent(config, deployer=Deployer(unit_id, config.state_dir, client=absent))
    doc = release(1, spec("svc", "app:v1"))
    agent.queue.put(message(8, doc))

    [outcome] = agent.apply_queued()

    assert (outcome.state, outcome.step) == ("failed", "engine") and "does not answer" in outcome.detail
    assert agent.queue.queued(8)["release"] == doc and agent.deployer.journal.load(8) is None
