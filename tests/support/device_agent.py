"""A bare device agent as a real process: `fleet-device run` on a broker, with no server, for its local API."""
from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.infra import free_port
from tests.support.stack import Process, _command, eventually


@dataclass
class RunningAgent:
    unit_id: str
    state_dir: Path
    url: str
    process: Process

    @property
    def execute_url(self) -> str:
        return f"{self.url}/dongle/{self.unit_id}/execute/"

    def execute(self, command, *arg, **kwarg) -> dict:
        response = requests.post(self.execute_url, json={"command": command, "arg": list(arg), "kwarg": kwarg},
                                 timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


def start_agent(broker, directory: Path, *extra, host="127.0.0.1") -> RunningAgent:
    unit_id = str(uuid.uuid4())
    state_dir = directory / f"agent-{unit_id[:8]}"
    port = free_port()
    args = _command("fleet-device") + [
        "run", "--unit-id", unit_id, "--broker", broker.url, "--state-dir", str(state_dir),
        "--api", f"{host}:{port}", "--minion-id-file", str(state_dir / "minion_id"),
        "--telemetry-sources", "", "--reconnect-window", "2", *extra,
    ]
    process = Process(args, {**os.environ, "FLEET_LOG_LEVEL": "DEBUG"},
                      directory / f"agent-{unit_id[:8]}.log").start()
    agent = RunningAgent(unit_id, state_dir, f"http://{host}:{port}", process)

    def answers():
        assert process.popen.poll() is None, process.log()
        try:
            return requests.get(agent.url + "/", timeout=2).status_code < 500
        except requests.RequestException:
            return False

    eventually(answers, 20, message=f"the agent's local API\n{process.log()}")
    return agent


def this_machines_lan_address(docker_client) -> str:
    """An address of this machine that is not loopback (the engine's bridge): a peer there is 'another device',
    and nothing sent to it leaves the machine."""
    config = (docker_client.networks.get("bridge").attrs["IPAM"]["Config"] or [{}])[0]
    gateway = config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
    try:
        socket.create_server((gateway, 0)).close()  # an address of this machine, or the engine is elsewhere
    except OSError:
        pytest.skip(f"the engine's bridge address {gateway} is not this machine's")
    return gateway
