"""`make run`'s stack, on its own ports and var dir: a release made with plain HTTP reaches a container here."""
import contextlib
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
    # Its output goes to a file: a pipe nobody reads would block it once full.
    output = tmp_path / "devstack.out"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "fleet-server"), "devstack"], env=env,
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    var = tmp_path / "var"
    try:
        eventually(lambda: (var / "admin-token").exists() and _up(ports), 60, message="the devstack to come up")
        yield {"var": var, "env": env, **ports, "process": process, "output": output}
    finally:
        # Each component runs in a session of its own, which killpg misses; the command line tells a
        # component that outlived the stop from a process that took its pid since.
        components = {pid: _cmdline(pid) for pid in _components(process.pid).values()}
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        for pid, cmdline in components.items():
            if cmdline and _cmdline(pid) == cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
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
    devstack["process"].wait(60)  # the components get 10 s to stop; a loaded machine is slow to start the stop
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
        again.wait(60)


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _components(devstack_pid: int) -> dict[str, int]:
    """The devstack's children by component (broker, server, worker, device), from /proc."""
    markers = {"mosquitto": "broker", "gunicorn": "server", "worker": "worker", "run": "device"}
    found = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat_file.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if int(fields[1]) != devstack_pid or fields[0] == "Z":
            continue
        words = {word.decode(errors="replace").rsplit("/", 1)[-1] for word in cmdline}
        for marker, component in markers.items():
            if marker in words:
                found[component] = int(stat_file.parent.name)
    return found


@pytest.mark.parametrize("component", ["worker", "broker", "device", "server"])
def test_a_component_that_dies_is_restarted_with_a_line_saying_so(devstack, component):
    before = eventually(lambda: (lambda found: found if len(found) == 4 else None)(
        _components(devstack["process"].pid)), 10, message="the four components")
    os.kill(before[component], signal.SIGKILL)
    eventually(lambda: f"{component} exited with code -9; restarting it" in devstack["output"].read_text(), 15,
               message=f"the line saying {component} is restarted")
    restarted = eventually(lambda: (lambda pid: pid if pid not in (None, before[component]) else None)(
        _components(devstack["process"].pid).get(component)), 30, message=f"a new {component} process")
    assert restarted != before[component]
    assert devstack["process"].poll() is None
    eventually(lambda: _up(devstack), 60, message="the devstack answering again")


def test_the_devstack_s_var_dir_database_and_logs_are_this_user_s_only(devstack):
    import stat

    var = devstack["var"]
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    private = [var / "fleet.db", var / "secret-key", var / "admin-token", *var.glob("*.log")]
    assert {path.name for path in var.glob("*.log")} >= {"broker.log", "server.log", "worker.log", "device.log"}
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
