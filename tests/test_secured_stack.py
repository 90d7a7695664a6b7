"""End to end on the secured broker: a device registers with a provisioning token, connects over TLS
with its own account, receives a release, and its report reaches the server; a wrong CA fails clearly."""
from __future__ import annotations

import json
import stat
import subprocess
import uuid

import pytest

from tests.support.infra import build_busybox_variant, free_port
from tests.support.stack import Process, _answers, _command, eventually, release_payload, running_stack

pytestmark = pytest.mark.slow


@pytest.fixture
def secured_stack(secured_broker, docker_client, tmp_path):
    """Server and worker using their own broker account; device accounts made through dynsec."""
    extra_env = secured_broker.server_env()
    with running_stack(secured_broker.url, docker_client, tmp_path, extra_env=extra_env, web_workers=1) as running:
        yield running


def _register(stack, state_dir, hardware_id):
    token = stack.post("/dongle/provisioning-tokens/", json={"name": "test"}).json()["token"]
    return subprocess.run(
        _command("fleet-device") + ["register", "--server", stack.url, "--token", token, "--state-dir", str(state_dir),
                                    "--hardware-id", hardware_id],
        capture_output=True, text=True, timeout=60, env=stack.env,
    )


def _run_agent(stack, state_dir, *extra):
    port = free_port()
    process = Process(
        _command("fleet-device") + ["run", "--state-dir", str(state_dir), "--api", f"127.0.0.1:{port}",
                                    "--minion-id-file", str(state_dir / "minion_id"), "--settle", "1", *extra],
        {**stack.env, "FLEET_LOG_LEVEL": "DEBUG"}, state_dir.parent / f"{state_dir.name}.log",
    ).start()
    stack.processes.append(process)
    return process, f"http://127.0.0.1:{port}"


def test_a_registered_device_gets_releases_over_tls_with_its_own_account(secured_stack, docker_client, unique_name,
                                                                         tmp_path):
    state_dir = tmp_path / "device"
    hardware_id = f"hw-{uuid.uuid4().hex[:12]}"
    registered = _register(secured_stack, state_dir, hardware_id)
    assert registered.returncode == 0, registered.stderr + secured_stack.logs()
    identity_file = state_dir / "identity.json"
    identity = json.loads(identity_file.read_text())
    assert stat.S_IMODE(identity_file.stat().st_mode) == 0o600
    assert identity["broker_url"].startswith("mqtts://") and identity["password"]
    assert (state_dir / "broker-ca.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")

    again = _register(secured_stack, state_dir, hardware_id)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["unit_id"] == identity["unit_id"]
    assert secured_stack.get("/dongle/devices/").json()["count"] == 1

    agent, api = _run_agent(secured_stack, state_dir)
    eventually(lambda: _answers(api + "/"), 20, message="the agent's local API")
    eventually(lambda: _connected(api), 20, message="the agent to connect over TLS")

    image = unique_name.image("secured", tag="v1")
    build_busybox_variant(docker_client, image, cmd=["sleep", "3600"])
    project = secured_stack.post("/docker/projects/", json={"name": "secured"}).json()
    created = secured_stack.post(f"/docker/projects/{project['id']}/releases/", json=release_payload(
        [identity["device_id"]], *image.rsplit(":", 1), name=f"s{uuid.uuid4().hex[:8]}"))
    assert created.status_code == 201, created.text
    secured_stack.agents.append(type("Registered", (), {"unit_id": identity["unit_id"]}))
    eventually(lambda: (state_dir / "projects" / str(project["id"]) / "queued.json").exists(), 30,
               message="the release to reach the agent" + secured_stack.logs())
    slept = subprocess.run(_command("fleet-device") + ["sleep", "--api", api.removeprefix("http://")],
                           capture_output=True, text=True, timeout=120)
    assert json.loads(slept.stdout)["return"][0]["state"] == "succeeded", slept.stdout + agent.log()
    eventually(lambda: secured_stack.get(f"/dongle/devices/{identity['device_id']}/").json()["docker_releases"]
               == [created.json()["id"]], 30, message="the worker to record the device's report")


def _connected(api):
    import requests

    return requests.get(api + "/status", timeout=5).json()["connected"]


def test_the_agent_refuses_a_broker_whose_certificate_its_ca_does_not_sign(secured_stack, tmp_path):
    from cryptography.hazmat.primitives import serialization

    from fleet_server.broker_accounts.bootstrap import make_certificate_authority

    state_dir = tmp_path / "device"
    assert _register(secured_stack, state_dir, f"hw-{uuid.uuid4().hex[:12]}").returncode == 0
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(make_certificate_authority("not the broker's CA")[1].public_bytes(serialization.Encoding.PEM))

    agent, _ = _run_agent(secured_stack, state_dir, "--ca-file", str(other_ca))
    assert agent.popen.wait(30) == 1
    assert "does not trust" in agent.log() and "certificate verify failed" in agent.log()
