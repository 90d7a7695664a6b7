"""The server's MQTT link: the one place that sets up paho (TCP_NODELAY, reconnects, MQTT v5 properties).

Domain code hands it plain values (a `Request`'s response topic, correlation id and expiry);
the properties paho needs are built here.
"""
import logging
import os
import random
import socket
import threading
import time
from typing import NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from ..config import mqtt_endpoint

log = logging.getLogger(__name__)


class Request(NamedTuple):
    """What an MQTT v5 request carries besides its payload: where to answer, what the answer
    carries back to match it, and how long the broker may hold it for a sleeping device."""

    response_topic: str
    correlation_id: str
    expiry_seconds: int


def request_properties(request: Request | None) -> Properties | None:
    """The PUBLISH properties of a request (None publishes a plain message)."""
    if request is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = request.response_topic
    properties.CorrelationData = request.correlation_id.encode()
    properties.MessageExpiryInterval = max(1, int(request.expiry_seconds))
    return properties


def connect_session(client: paho.Client, host: str, port: int, *, session_expiry: int):
    """Connect at once (blocking), resuming the persistent session of the client's id, kept `session_expiry` s."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry
    client.connect(host, port, keepalive=30, clean_start=False, properties=properties)


def end_session(client: paho.Client):
    """Disconnect and have the broker forget the session (expiry 0), with whatever it still queues."""
    properties = Properties(PacketTypes.DISCONNECT)
    properties.SessionExpiryInterval = 0
    client.disconnect(properties=properties)


def _nodelay(client, userdata, sock):
    # Without it a QoS 1 round trip waits on Nagle's algorithm for tens of milliseconds.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def new_client(client_id: str, *, username=None, password=None, tls=False, ca_file=None, manual_ack=False,
               reconnect_max_delay: float = 30) -> paho.Client:
    """A paho MQTT v5 client with TCP_NODELAY and reconnects backing off from 1 s, not yet connected."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    client.on_socket_open = _nodelay
    if username:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set(ca_certs=ca_file)
    client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_delay)
    return client


def make_client(config, client_id, *, persistent=False, manual_ack=False) -> paho.Client:
    """A paho MQTT v5 client configured from the app config, not yet connected."""
    host, port, tls = mqtt_endpoint(config["FLEET_MQTT_URL"])
    client = new_client(client_id, username=config.get("FLEET_MQTT_USERNAME"), password=config.get("FLEET_MQTT_PASSWORD"),
                        tls=tls, ca_file=config.get("FLEET_MQTT_CA_FILE"), manual_ack=manual_ack)
    # paho holds back publishes beyond 20 unacknowledged; a fleet-wide release is thousands
    # of them, and the broker's own Receive Maximum is the limit that matters.
    client.max_inflight_messages_set(1000)
    client.user_data_set({"host": host, "port": port, "persistent": persistent})
    return client


def connect(client: paho.Client, *, session_expiry: int = 0):
    """Start connecting in the background; paho reconnects on its own afterwards."""
    target = client.user_data_get()
    properties = Properties(PacketTypes.CONNECT)
    if session_expiry:
        properties.SessionExpiryInterval = session_expiry
    client.connect_async(
        target["host"], target["port"], keepalive=30, clean_start=not target["persistent"], properties=properties
    )
    client.loop_start()


def process_client_id(role: str) -> str:
    return f"fleet-{role}-{socket.gethostname()}-{os.getpid()}-{random.randrange(16**6):06x}"


class Publisher:
    """Publishes from a web process. Lazily connected after the process forks."""

    def __init__(self, config):
        self._config = config
        self._client = None
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._waited = False

    def _ensure_client(self):
        with self._lock:
            if self._client is None:
                client = make_client(self._config, process_client_id("api"))
                client.on_connect = lambda c, u, f, rc, p: rc.is_failure or self._connected.set()
                client.on_disconnect = lambda c, u, f, rc, p: self._connected.clear()
                connect(client)
                self._client = client
        return self._client

    def ready(self) -> bool:
        """Whether the broker link is up; only the first call waits (briefly) for it to come up.

        Later calls fail fast while the broker is away, leaving rows in the outbox for the sweep.
        """
        client = self._ensure_client()
        connect_wait, self._waited = (0 if self._waited else min(self._config["FLEET_PUBLISH_TIMEOUT"], 3.0)), True
        if not self._connected.wait(connect_wait):
            log.warning("broker not reachable; publications left in the outbox")
            return False
        return client.is_connected()

    def publish(self, topic: str, payload: bytes, *, retain=False, qos=1, timeout=None, request=None) -> bool:
        """Publish and wait for the broker's acknowledgement; False if it did not come."""
        timeout = self._config["FLEET_PUBLISH_TIMEOUT"] if timeout is None else timeout
        if not self.ready():
            return False
        return publish_and_wait(self._client, topic, payload, retain=retain, qos=qos, timeout=timeout,
                                request=request)

    def publish_many(self, messages, *, retain=False, qos=1, timeout=None) -> list[bool]:
        """Publish [(topic, payload)] without waiting in between; which ones the broker acknowledged."""
        timeout = self._config["FLEET_PUBLISH_TIMEOUT"] if timeout is None else timeout
        client = self._ensure_client()
        connect_wait, self._waited = (0 if self._waited else min(timeout, 3.0)), True
        if not self._connected.wait(connect_wait):
            log.warning("broker not reachable; %d publication(s) left in the outbox", len(messages))
            return [False] * len(messages)
        return publish_many(client, messages, retain=retain, qos=qos, timeout=timeout)

    def close(self):
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()


def publish_and_wait(client, topic, payload, *, retain=False, qos=1, timeout=5.0, request: Request | None = None) -> bool:
    """Publish (as a request when `request` is given) and wait for the broker's acknowledgement."""
    if not client.is_connected():
        return False
    info = client.publish(topic, payload, qos=qos, retain=retain, properties=request_properties(request))
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:
        log.warning("publish failed topic=%s error=%s", topic, exc)
        return False
    return info.is_published()


def publish_many(client, messages, *, retain=False, qos=1, timeout=5.0) -> list[bool]:
    """Publish every (topic, payload), then wait for the acknowledgements; one bool per message.

    Waiting for each PUBACK before the next publish costs a round trip per device; here
    the messages share the broker's in-flight window and the waits overlap.
    """
    if not client.is_connected():
        return [False] * len(messages)
    handles = [client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages]
    deadline = time.monotonic() + timeout
    confirmed = []
    for info in handles:
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            log.warning("publish failed mid=%s error=%s", info.mid, exc)
        confirmed.append(info.is_published())
    return confirmed


def publisher_for(app) -> Publisher:
    publisher = app.extensions.get("fleet_publisher")
    if publisher is None:
        publisher = app.extensions["fleet_publisher"] = Publisher(app.config)
    return publisher
