"""An agent whose device was deleted says so once and stops, rather than reconnecting forever.

On the secured broker (dynamic security, per-device accounts): the server deletes the device and
its broker account, the broker drops the agent's connection and refuses its credentials from then on.
"""
from __future__ import annotations

import uuid

import pytest

from fleet_device.cli import EXIT_CREDENTIALS_REFUSED
from tests.support.stack import _answers, eventually
from tests.test_secured_stack import _connected, _register, _run_agent, secured_stack  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

REFUSAL = "the broker refused this device's credentials"


def test_an_agent_whose_device_is_deleted_says_so_once_and_exits_with_its_own_code(secured_stack, tmp_path):
    state_dir = tmp_path / "device"
    registered = _register(secured_stack, state_dir, f"hw-{uuid.uuid4().hex[:12]}")
    assert registered.returncode == 0, registered.stderr + secured_stack.logs()
    agent, api = _run_agent(secured_stack, state_dir, "--reconnect-window", "1")
    eventually(lambda: _answers(api + "/") and _connected(api), 30, message="the agent connected over TLS")
    device = secured_stack.get("/dongle/devices/").json()["results"][0]

    assert secured_stack.request("DELETE", f"/dongle/devices/{device['id']}/").status_code == 204

    assert agent.popen.wait(60) == EXIT_CREDENTIALS_REFUSED, agent.log()
    log = agent.log()
    assert log.count(REFUSAL) == 1, log
    assert "deleted on the server or its credentials were revoked" in log
    assert "fleet-device register" in log
    assert "; reconnecting" not in log.split(REFUSAL, 1)[1]


def test_an_agent_started_after_its_device_was_deleted_stops_at_the_first_refusal(secured_stack, tmp_path):
    state_dir = tmp_path / "device"
    assert _register(secured_stack, state_dir, f"hw-{uuid.uuid4().hex[:12]}").returncode == 0
    device = secured_stack.get("/dongle/devices/").json()["results"][0]
    assert secured_stack.request("DELETE", f"/dongle/devices/{device['id']}/").status_code == 204

    agent, _api = _run_agent(secured_stack, state_dir, "--reconnect-window", "1")
    assert agent.popen.wait(60) == EXIT_CREDENTIALS_REFUSED, agent.log()
    assert agent.log().count(REFUSAL) == 1
