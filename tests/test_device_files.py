"""What the agent keeps on disk is for the agent alone: files 0600, directories 0700, after a real agent ran."""
from __future__ import annotations

import os
import stat
import uuid

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

import fleet_wire as wire
from tests.support.device_agent import start_agent
from tests.support.stack import eventually

pytestmark = pytest.mark.slow

# The unit id written for other programs on the device to read, as Salt's minion_id is; not a secret.
SHARED_ON_PURPOSE = {"minion_id"}


def _publish(broker, topic: str, payload: bytes):
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _release_with_registry(project_id: int) -> bytes:
    """A release for the queue (not applied: nothing asks the agent to sleep) and a registry with a password."""
    return wire.encode(wire.from_builtins(wire.ReleaseMessage, {
        "project_id": project_id,
        "release": {"id": 1, "version": "1.0.0", "version_hash": "0123abcd", "containers": [], "remove_containers": []},
        "registries": [{"id": 3, "url": "registry.example:5000", "username": "fleet", "password": "hunter2"}],
    }))


def _modes(root) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def test_every_file_the_agent_writes_is_private_and_an_older_open_state_dir_is_tightened(broker, tmp_path):
    # An older agent left the state dir and its command journal readable by everyone.
    state_parent = tmp_path / "device"
    state_parent.mkdir()
    previous_umask = os.umask(0o022)
    try:
        agent = start_agent(broker, state_parent)
        agent.process.stop()
        for directory in (agent.state_dir, agent.state_dir / "commands"):
            directory.chmod(0o755)
        (agent.state_dir / "commands" / "journal.log").chmod(0o644)
        (agent.state_dir / "telemetry.db").chmod(0o644)
        agent.process.start()
    finally:
        os.umask(previous_umask)
    try:
        eventually(lambda: _connected(agent.url), 20, message="the agent connected to the broker")
        reading = {"field": "obd.bat.voltage", "type": "float", "value": 12.6}
        assert requests.post(agent.url + "/logbook/", json=reading, timeout=10).status_code == 202
        project_id = 40 + uuid.uuid4().int % 1000
        _publish(broker, wire.release_topic(agent.unit_id, project_id), _release_with_registry(project_id))
        eventually(lambda: (agent.state_dir / "registries.json").exists()
                   and (agent.state_dir / "projects" / str(project_id) / "queued.json").exists(), 20,
                   message=f"the release queued\n{agent.process.log()}")
        assert requests.post(f"{agent.url}/dongle/{agent.unit_id}/execute/", json={"command": "test.ping"},
                             timeout=10).json()["return"] is True
    finally:
        agent.process.stop()

    modes = _modes(agent.state_dir)
    expected = {"telemetry.db", "commands/journal.log", "registries.json", f"projects/{project_id}/queued.json"}
    assert expected <= set(modes), sorted(modes)
    directories = {name: mode for name, mode in modes.items() if (agent.state_dir / name).is_dir()}
    files = {name: mode for name, mode in modes.items() if name not in directories and name not in SHARED_ON_PURPOSE}
    assert {name: oct(mode) for name, mode in directories.items() if mode != 0o700} == {}
    assert {name: oct(mode) for name, mode in files.items() if mode != 0o600} == {}


def _connected(url: str) -> bool:
    try:
        return requests.get(url + "/status", timeout=2).json()["connected"]
    except requests.RequestException:
        return False
