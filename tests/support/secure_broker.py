"""Pytest plugin: a secured Mosquitto (dynamic security, anonymous off, TLS) run the way `make run` runs it."""
from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet_server.broker_accounts import DynSecControl, ensure_server_account
from fleet_server.broker_accounts.bootstrap import ADMIN_USERNAME, SERVER_USERNAME, prepare
from tests.support.infra import LOOPBACK, free_port, wait_until


@dataclass
class SecuredBroker:
    host: str
    port: int  # plain MQTT on loopback
    tls_port: int
    ca_file: Path
    admin: tuple[str, str]
    server: tuple[str, str]
    directory: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self.tls_port}"

    def control(self) -> DynSecControl:
        return DynSecControl(self.host, self.port, *self.admin)

    def server_env(self) -> dict:
        """Settings a Fleet server process needs to use this broker and manage its accounts."""
        return {
            "FLEET_MQTT_URL": self.url,
            "FLEET_MQTT_USERNAME": self.server[0],
            "FLEET_MQTT_PASSWORD": self.server[1],
            "FLEET_DYNSEC_USERNAME": self.admin[0],
            "FLEET_DYNSEC_PASSWORD": self.admin[1],
            "FLEET_DEVICE_BROKER_URL": self.tls_url,
            "FLEET_DEVICE_BROKER_CA_FILE": str(self.ca_file),
        }

    def log(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")


def _accepts(host: str, port: int, username: str, password: str) -> bool:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    try:
        client.connect(host, port, keepalive=10)
        client.loop(timeout=1.0)
        return client.is_connected()
    except OSError:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


def start_secured_broker(directory: Path, *, timeout: float = 30.0) -> SecuredBroker:
    """Prepare the files under `directory`, start mosquitto on free loopback ports, create the server account."""
    port, tls_port = free_port(), free_port()
    files = prepare(directory, port=port, tls_port=tls_port)
    log_handle = open(directory / "mosquitto.log", "ab")
    process = subprocess.Popen(["mosquitto", "-c", str(files.config)], stdout=log_handle, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    log_handle.close()
    admin = (ADMIN_USERNAME, files.admin_password.read_text().strip())
    server = (SERVER_USERNAME, files.server_password.read_text().strip())
    broker = SecuredBroker(LOOPBACK, port, tls_port, files.ca_certificate, admin, server, directory, process)
    try:
        wait_until(lambda: process.poll() is None and _accepts(LOOPBACK, port, *admin), timeout=timeout,
                   what=f"secured mosquitto on {port}")
        control = broker.control()
        try:
            ensure_server_account(control, *server)
        finally:
            control.close()
    except BaseException:
        stop_secured_broker(broker)
        raise
    return broker


def stop_secured_broker(broker: SecuredBroker) -> None:
    if broker.process.poll() is None:
        broker.process.terminate()
        try:
            broker.process.wait(10)
        except subprocess.TimeoutExpired:
            broker.process.kill()
            broker.process.wait(10)


@pytest.fixture(scope="session")
def secured_broker(tmp_path_factory) -> SecuredBroker:
    """A Mosquitto with anonymous access off, the dynsec plugin, a TLS listener; shared by the session."""
    broker = start_secured_broker(tmp_path_factory.mktemp("secured-broker"))
    try:
        yield broker
    finally:
        stop_secured_broker(broker)
