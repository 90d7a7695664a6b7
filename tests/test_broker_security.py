"""The real broker enforces who may do what: per-device accounts, ACLs, anonymous off, TLS."""
from __future__ import annotations

import ssl
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import fleet_wire as wire
from fleet_server import broker_accounts
from fleet_server.broker_accounts.bootstrap import make_certificate_authority, make_server_certificate
from tests.support.stack import eventually


class Connection:
    """A paho client that records what the broker answered."""

    def __init__(self, broker, username=None, password=None, *, client_id=None, tls_ca=None, port=None):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"fleet-test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.connack = None
        self.suback: dict[int, list] = {}
        self.puback: dict[int, object] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.suback.__setitem__(mid, codes)
        self.client.on_publish = lambda c, u, mid, rc, p: self.puback.__setitem__(mid, rc)
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.on_disconnect = lambda *args: self.disconnected.set()
        self.client.connect(broker.host, port or broker.port, keepalive=10)
        self.client.loop_start()
        eventually(lambda: self.connack is not None or self.disconnected.is_set(), 10, 0.02, "a CONNACK")

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic: str) -> bool:
        """True when the broker granted the subscription."""
        _, mid = self.client.subscribe(topic, qos=1)
        codes = eventually(lambda: self.suback.get(mid), 10, 0.02, f"SUBACK for {topic}")
        return not codes[0].is_failure

    def publish(self, topic: str, payload: bytes = b"{}") -> bool:
        """True when the broker acknowledged the QoS 1 publication as accepted."""
        info = self.client.publish(topic, payload, qos=1)
        code = eventually(lambda: self.puback.get(info.mid), 10, 0.02, f"PUBACK for {topic}")
        return not code.is_failure

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def accounts_app(secured_broker, tmp_path_factory):
    """A Flask app whose broker account management talks to the secured broker."""
    from fleet_server.app import create_app

    tmp = tmp_path_factory.mktemp("accounts-app")
    app = create_app({
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp / 'app.db'}",
        "FLEET_VAR_DIR": str(tmp / "var"),
        "FLEET_MQTT_URL": secured_broker.url,
        "FLEET_DYNSEC_USERNAME": secured_broker.admin[0],
        "FLEET_DYNSEC_PASSWORD": secured_broker.admin[1],
        "TESTING": True,
    })
    yield app
    control = app.extensions.get("fleet_dynsec")
    if control is not None:
        control.close()


@pytest.fixture(scope="module")
def devices(accounts_app):
    """Two devices with broker accounts: {"A": (unit_id, password), "B": ...}."""
    with accounts_app.app_context():
        made = {}
        for name in ("A", "B"):
            unit_id = str(uuid.uuid4())
            made[name] = (unit_id, broker_accounts.issue_device_credentials(unit_id)[1])
    yield made
    with accounts_app.app_context():
        for unit_id, _ in made.values():
            broker_accounts.remove_device_account(unit_id)


@pytest.fixture
def connect(secured_broker):
    opened = []

    def open_connection(*args, **kwargs):
        connection = Connection(secured_broker, *args, **kwargs)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        connection.close()


def as_device(connect, devices, name, **kwargs):
    unit_id, password = devices[name]
    return connect(unit_id, password, client_id=broker_accounts.device_client_id(unit_id), **kwargs)


def test_an_anonymous_client_is_refused(connect, secured_broker):
    assert not connect().accepted
    assert not connect(tls_ca=secured_broker.ca_file, port=secured_broker.tls_port).accepted


def test_a_wrong_password_is_refused(connect, devices):
    unit_id, _ = devices["A"]
    assert not connect(unit_id, "not-the-password", client_id=broker_accounts.device_client_id(unit_id)).accepted


def test_a_device_account_cannot_connect_with_another_devices_client_id(connect, devices):
    unit_id, password = devices["A"]
    other = devices["B"][0]
    assert not connect(unit_id, password, client_id=broker_accounts.device_client_id(other)).accepted


def test_a_device_subscribes_to_its_own_releases_and_commands(connect, devices):
    device = as_device(connect, devices, "A")
    unit_id = devices["A"][0]
    assert device.accepted
    assert device.subscribe(wire.release_subscription(unit_id))
    assert device.subscribe(wire.device_topic(unit_id, "commands"))


@pytest.mark.parametrize("topic", [
    "fleet/v1/devices/{B}/releases/+",
    "fleet/v1/devices/{B}/releases/1",
    "fleet/v1/devices/{B}/commands",
    "fleet/v1/devices/{B}/#",
    "fleet/v1/devices/+/releases/+",
    "fleet/v1/devices/+/commands",
    "fleet/v1/devices/{A}/deployments",
    "$share/steal/fleet/v1/devices/{B}/commands",
    "#",
    "$SYS/#",
    "$CONTROL/dynamic-security/#",
    "$CONTROL/dynamic-security/v1/response",
])
def test_a_device_cannot_subscribe_beyond_its_own_inbound_topics(connect, devices, topic):
    device = as_device(connect, devices, "A")
    assert not device.subscribe(topic.format(A=devices["A"][0], B=devices["B"][0]))


@pytest.mark.parametrize("kind", ["results", "deployments", "telemetry", "status"])
def test_a_device_cannot_publish_on_another_devices_topics(connect, devices, secured_broker, kind):
    watcher = connect(*secured_broker.server)
    assert watcher.subscribe(wire.device_topic(devices["B"][0], kind))
    device = as_device(connect, devices, "A")

    assert not device.publish(wire.device_topic(devices["B"][0], kind), b'{"v": 1}')
    assert device.publish(wire.device_topic(devices["A"][0], kind), b'{"v": 1}')  # its own: accepted
    assert watcher.messages == []


@pytest.mark.parametrize("topic", ["fleet/v1/devices/{A}/releases/1", "fleet/v1/devices/{A}/commands",
                                   "fleet/v1/devices/{B}/releases/1", "fleet/v1/other"])
def test_a_device_cannot_publish_releases_or_commands_even_to_itself(connect, devices, topic):
    device = as_device(connect, devices, "A")
    assert not device.publish(topic.format(A=devices["A"][0], B=devices["B"][0]))


def test_a_device_cannot_create_accounts_through_the_control_topic(connect, devices, secured_broker):
    device = as_device(connect, devices, "A")
    evil = f"evil-{uuid.uuid4().hex[:6]}"
    command = {"commands": [{"command": "createClient", "username": evil, "password": "pw"}]}
    import json

    assert not device.publish("$CONTROL/dynamic-security/v1", json.dumps(command).encode())
    assert not connect(evil, "pw").accepted


def test_the_server_account_publishes_releases_and_reads_reports_but_not_the_control_topic(connect, secured_broker):
    server = connect(*secured_broker.server)
    unit_id = str(uuid.uuid4())
    assert server.publish(wire.release_topic(unit_id, 1))
    assert server.publish(wire.device_topic(unit_id, "commands"))
    assert server.subscribe(wire.shared_subscription("deployments", "fleet-test"))
    assert not server.subscribe("$CONTROL/dynamic-security/#")
    assert not server.publish("$CONTROL/dynamic-security/v1")
    assert not server.publish(wire.device_topic(unit_id, "status"))


def test_a_device_verifies_the_broker_certificate_over_tls(connect, devices, secured_broker):
    device = as_device(connect, devices, "A", tls_ca=secured_broker.ca_file, port=secured_broker.tls_port)
    assert device.accepted and device.subscribe(wire.release_subscription(devices["A"][0]))


def test_a_broker_certificate_from_another_ca_is_rejected(devices, secured_broker, tmp_path):
    ca_key, ca_certificate = make_certificate_authority("someone else's CA")
    from cryptography.hazmat.primitives import serialization

    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(other_ca))
    client.username_pw_set(*devices["A"])
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        client.connect(secured_broker.host, secured_broker.tls_port)


def test_removing_a_device_account_drops_its_connection_and_refuses_it_afterwards(connect, accounts_app):
    unit_id = str(uuid.uuid4())
    with accounts_app.app_context():
        _, password = broker_accounts.issue_device_credentials(unit_id)
    device = connect(unit_id, password, client_id=broker_accounts.device_client_id(unit_id))
    assert device.accepted
    with accounts_app.app_context():
        assert broker_accounts.remove_device_account(unit_id)
    assert device.disconnected.wait(10)
    assert not connect(unit_id, password, client_id=broker_accounts.device_client_id(unit_id)).accepted


def test_issuing_credentials_again_replaces_the_old_password(connect, accounts_app):
    unit_id = str(uuid.uuid4())
    with accounts_app.app_context():
        _, old = broker_accounts.issue_device_credentials(unit_id)
        _, new = broker_accounts.issue_device_credentials(unit_id)
        try:
            client_id = broker_accounts.device_client_id(unit_id)
            assert not connect(unit_id, old, client_id=client_id).accepted
            assert connect(unit_id, new, client_id=client_id).accepted
        finally:
            broker_accounts.remove_device_account(unit_id)
