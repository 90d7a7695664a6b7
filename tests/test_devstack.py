"""`make run`'s stack, on its own ports and var dir: a release made with plain HTTP reaches a container here."""
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from tests.support.infra import build_busybox_variant, free_port
from tests.support.stack import eventually, release_payload

pytestmark = pytest.mark.slow


@pytest.fixture
def devstack(tmp_path, docker_client):
    ports = {"FLEET_BROKER_PORT": free_port(), "FLEET_HTTP_PORT": free_port(), "FLEET_DEVICE_API_PORT": free_port(),
             "FLEET_BROKER_TLS_PORT": free_port()}
    env = {**os.environ, "FLEET_VAR_DIR": str(tmp_path / "var"), **{k: str(v) for k, v in ports.items()}}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "fleet-server"), "devstack"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    var = tmp_path / "var"
    try:
        eventually(lambda: (var / "admin-token").exists() and _up(ports), 60, message="the devstack to come up")
        yield {"var": var, "env": env, **ports, "process": process}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        unit_id = (var / "device" / "unit_id").read_text().strip()
        for container in docker_client.containers.list(all=True, filters={"label": f"fleet.unit_id={unit_id}"}):
            container.remove(force=True)


def _up(ports):
    try:
        requests.get(f"http://127.0.0.1:{ports['FLEET_HTTP_PORT']}/health", timeout=1).raise_for_status()
        requests.get(f"http://127.0.0.1:{ports['FLEET_DEVICE_API_PORT']}/", timeout=1).raise_for_status()
        return True
    except requests.RequestException:
        return False


def test_the_devstack_deploys_a_release_to_this_machine_after_sleep(devstack, docker_client, unique_name):
    token = (devstack["var"] / "admin-token").read_text().strip()
    api = f"http://127.0.0.1:{devstack['FLEET_HTTP_PORT']}"
    headers = {"Authorization": f"APIToken {token}"}
    devices = requests.get(f"{api}/dongle/devices/", headers=headers, timeout=10).json()
    assert devices["count"] == 1
    device = devices["results"][0]
    image = unique_name.image("devstack", tag="v1")
    build_busybox_variant(docker_client, image, cmd=["sleep", "3600"])
    project = requests.post(f"{api}/docker/projects/", json={"name": "demo"}, headers=headers, timeout=10).json()
    name = f"app{uuid.uuid4().hex[:8]}"
    created = requests.post(f"{api}/docker/projects/{project['id']}/releases/", headers=headers, timeout=10,
                            json=release_payload([device["id"]], *image.rsplit(":", 1), name=name))
    assert created.status_code == 201, created.text
    queued = devstack["var"] / "device" / "state" / "projects" / str(project["id"]) / "queued.json"
    eventually(queued.exists, 30, message="the release in the local agent's queue")

    slept = subprocess.run(
        [str(Path(sys.executable).parent / "fleet-device"), "sleep", "--api", f"127.0.0.1:{devstack['FLEET_DEVICE_API_PORT']}"],
        capture_output=True, text=True, timeout=120,
    )
    assert slept.returncode == 0, slept.stderr
    assert docker_client.containers.get(f"deployment-{name}-{project['id']}").status == "running"
    device_url = f"{api}/dongle/devices/{device['id']}/"
    eventually(lambda: requests.get(device_url, headers=headers, timeout=10).json()["docker_releases"]
               == [created.json()["id"]], 30, message="docker_releases on the local device")


def test_rerunning_the_devstack_keeps_its_token_and_device(devstack):
    token = (devstack["var"] / "admin-token").read_text()
    unit_id = (devstack["var"] / "device" / "unit_id").read_text()
    devstack["process"].send_signal(signal.SIGINT)
    devstack["process"].wait(30)
    again = subprocess.Popen([str(Path(sys.executable).parent / "fleet-server"), "devstack"], env=devstack["env"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        eventually(lambda: _up(devstack), 60, message="the devstack to come up again")
        assert (devstack["var"] / "admin-token").read_text() == token
        assert (devstack["var"] / "device" / "unit_id").read_text() == unit_id
        response = requests.get(f"http://127.0.0.1:{devstack['FLEET_HTTP_PORT']}/dongle/devices/",
                                headers={"Authorization": f"APIToken {token.strip()}"}, timeout=10)
        assert response.json()["count"] == 1
    finally:
        again.send_signal(signal.SIGINT)
        again.wait(30)
