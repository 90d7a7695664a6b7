"""Crash safety: a deploy SIGKILLed at several steps, and an engine restarted mid-deploy, end on one whole release."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import docker
import pytest

from fleet_device.deploy import OLD_SUFFIX, DeployError, Deployer, backup_path
from tests.support.deploy import SERVE, TRUSTING, message, owned_containers, release, spec, workload
from tests.support.infra import build_busybox_variant
from tests.support.stack import eventually, remove_agent_containers

pytestmark = pytest.mark.slow
PROJECT = 51
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def device(docker_client, unique_name, tmp_path, busybox_image):
    """Release 1 (two containers, one with a data dir) running beside an initial container; release 2 ready."""
    unit_id = str(uuid.uuid4())
    state_dir = tmp_path / "state"
    data = tmp_path / "data"
    data.mkdir()
    names = [unique_name("web"), unique_name("db")]
    legacy = unique_name("legacy")
    docker_client.containers.run(busybox_image, SERVE, name=legacy, detach=True, network_mode="none")
    v1_image, v2_image = workload(docker_client, unique_name, "v1"), workload(docker_client, unique_name, "v2")

    def make(release_id, image, initial=()):
        doc = release(release_id, spec(names[0], image), spec(names[1], image), remove_containers=initial)
        doc["containers"][1].update(purge_data=True)
        doc["containers"][1]["startup_parameters"]["binds"] = [f"{data}:/data"]
        return doc

    v1, v2 = make(1, v1_image), make(2, v2_image, initial=[legacy])
    Deployer(unit_id, state_dir, client=docker_client, settle_seconds=0.3, policy=TRUSTING).apply(
        PROJECT, v1, {}, context=message(PROJECT, v1))
    Deployer(unit_id, state_dir, client=docker_client).forget(PROJECT)
    (data / "v1.db").write_text("what release 1 wrote")
    yield {"unit_id": unit_id, "state_dir": state_dir, "data": data, "names": names, "legacy": legacy,
           "v1": v1, "v2": v2, "ids": {n: docker_client.containers.get(n).id for n in names}}
    remove_agent_containers(docker_client, [unit_id])


def _deploy_until_killed(device, halt_at, tmp_path):
    config = tmp_path / "child.json"
    config.write_text(json.dumps({"unit_id": device["unit_id"], "state_dir": str(device["state_dir"]),
                                  "message": message(PROJECT, device["v2"]), "previous": device["v1"],
                                  "halt_at": halt_at, "settle": 30 if halt_at[0] == "verify" else 0.3}))
    child = subprocess.Popen([sys.executable, "-m", "tests.support.deploy_child", str(config)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: (device["state_dir"] / "halted").exists() or child.poll() is not None, 60,
                   message=f"the deploy to reach {halt_at}")
        assert child.poll() is None, child.stdout.read().decode()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def _assert_runs(docker_client, device, release_id):
    owned = owned_containers(docker_client, device["unit_id"], PROJECT)
    assert sorted(owned) == sorted(device["names"]), owned
    assert all(c.status == "running" and c.labels["fleet.release"] == str(release_id) for c in owned.values())
    assert not backup_path(str(device["data"]), PROJECT).exists()
    return owned


@pytest.mark.parametrize("halt_at", [("stop", "done", 2), ("purge", "done", 1), ("start", "done", 1),
                                     ("verify", "started", 1)], ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
def test_a_deploy_killed_before_verification_is_rolled_back_on_restart(docker_client, device, halt_at, tmp_path):
    _deploy_until_killed(device, list(halt_at), tmp_path)

    recovered = Deployer(device["unit_id"], device["state_dir"], client=docker_client).recover()

    assert [(r.state, r.step) for r in recovered] == [("rolled_back", halt_at[0])]
    assert recovered[0].context["release"]["id"] == 2 and "agent stopped" in recovered[0].detail
    owned = _assert_runs(docker_client, device, 1)
    assert {n: c.id for n, c in owned.items()} == device["ids"]
    assert docker_client.containers.get(device["legacy"]).status == "running"
    assert [p.name for p in device["data"].iterdir()] == ["v1.db"]


def test_a_deploy_killed_while_cleaning_up_after_verification_is_completed_on_restart(docker_client, device, tmp_path):
    _deploy_until_killed(device, ["remove", "done", 1], tmp_path)

    recovered = Deployer(device["unit_id"], device["state_dir"], client=docker_client).recover()

    assert [r.state for r in recovered] == ["succeeded"]
    _assert_runs(docker_client, device, 2)
    names = {c.name for c in docker_client.containers.list(all=True)}
    assert device["legacy"] not in names and not any(n.endswith(OLD_SUFFIX) for n in names)
    assert list(device["data"].iterdir()) == []


# --- an engine restarted mid-deploy: a private dockerd, never the shared one ------------------------


class PrivateEngine:
    """A dockerd of the test's own: own network namespace, data root, exec root and socket; no bridge, no iptables."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="fleet-dockerd-", dir="/tmp"))
        self.host = f"unix://{self.root}/docker.sock"
        self.process = None

    def start(self):
        self.log = open(self.root / "dockerd.log", "ab")
        # Its own network namespace: a dockerd started with --bridge=none deletes any interface
        # named docker0 it can see, which in the host namespace is the shared engine's bridge.
        self.process = subprocess.Popen(
            ["unshare", "--net", "--", "dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host, "--bridge=none", "--iptables=false",
             "--ip6tables=false"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        # A fixed API version: the default asks the daemon at once, before its socket exists.
        client = docker.from_env(environment={"DOCKER_HOST": self.host}, timeout=30, version="1.41")
        eventually(lambda: self._answers(client), 60, message="the private dockerd")
        return client

    def _answers(self, client):
        if self.process.poll() is not None:
            raise AssertionError("private dockerd exited:\n" + (self.root / "dockerd.log").read_text()[-3000:])
        try:
            return client.ping()
        except Exception:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@pytest.fixture
def private_engine():
    engine = PrivateEngine()
    try:
        yield engine
    finally:
        engine.stop()
        subprocess.run(["umount", "-R", str(engine.root / "data")], capture_output=True, timeout=30)
        shutil.rmtree(engine.root, ignore_errors=True)


def test_an_engine_restarted_mid_deploy_ends_on_the_old_release_alone(private_engine, tmp_path):
    client = private_engine.start()
    unit_id, state_dir, name = str(uuid.uuid4()), tmp_path / "state", f"fleet-test-restart-{uuid.uuid4().hex[:6]}"
    images = [build_busybox_variant(client, f"fleet-test/restart:{tag}", cmd=SERVE) for tag in ("v1", "v2")]
    v1, v2 = release(1, spec(name, images[0])), release(2, spec(name, images[1]))
    for doc in (v1, v2):
        doc["containers"][0]["startup_parameters"]["restart_policy"] = "always"
    Deployer(unit_id, state_dir, client=client, settle_seconds=0.3).apply(PROJECT, v1, {}, context=message(PROJECT, v1))
    Deployer(unit_id, state_dir, client=client).forget(PROJECT)

    verifying = threading.Event()
    outcome = {}
    slow = Deployer(unit_id, state_dir, client=client, settle_seconds=60,
                    on_step=lambda step, when: step.action == "verify" and verifying.set())

    def deploy_v2():
        try:
            slow.apply(PROJECT, v2, {}, previous=v1, context=message(PROJECT, v2))
        except DeployError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=deploy_v2, daemon=True)
    worker.start()
    assert verifying.wait(60), "the deploy never reached verification"
    private_engine.stop()
    client = private_engine.start()
    worker.join(120)
    assert not worker.is_alive() and outcome["error"].step == "verify", outcome

    # The agent's next start (or next apply) finishes whatever rollback the dying engine refused.
    restarted = Deployer(unit_id, state_dir, client=client)
    restarted.recover()
    restarted.forget(PROJECT)

    def one_set_of_v1():
        owned = owned_containers(client, unit_id)
        return list(owned) == [name] and owned[name].status == "running" and owned[name].labels["fleet.release"] == "1"

    eventually(one_set_of_v1, 30, message="exactly release 1's container running")
    time.sleep(2)  # the engine restarts "always" containers on its own: nothing else may come back
    assert one_set_of_v1(), owned_containers(client, unit_id)
    assert restarted.journal.load(PROJECT) is None
