"""The agent's one MQTT v5 session: paho set up once, TCP_NODELAY, reconnects with jitter, v5 properties.

Domain code passes and receives plain values: a topic, a payload, a correlation id; it never
builds paho properties or touches the socket.
"""
from __future__ import annotations

import logging
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

# CONNACK reason codes that mean the broker no longer accepts this device's credentials.
BAD_CREDENTIALS = 134  # bad user name or password
NOT_AUTHORIZED = 135

# Publications paho keeps while the broker is away; past this publish() refuses.
MAX_QUEUED_MESSAGES = 10000


@dataclass(frozen=True)
class Received:
    """A message as the broker delivered it, its MQTT v5 properties read into plain values."""

    topic: str
    payload: bytes
    qos: int = 0
    mid: int = 0
    correlation: bytes | None = None  # CorrelationData
    response_topic: str | None = None  # ResponseTopic
    expires_in: float | None = None  # MessageExpiryInterval left when the broker sent it, seconds

    @classmethod
    def of(cls, message: paho.MQTTMessage) -> Received:
        properties = getattr(message, "properties", None)
        return cls(message.topic, message.payload, message.qos, message.mid,
                   getattr(properties, "CorrelationData", None), getattr(properties, "ResponseTopic", None),
                   getattr(properties, "MessageExpiryInterval", None))


@dataclass(frozen=True)
class MqttSettings:
    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600  # the broker keeps the session (and queued QoS 1 messages) this long
    # After losing the broker, the first reconnection attempt falls anywhere in this many
    # seconds; each failed attempt doubles the window, up to reconnect_max.
    reconnect_window: float = 12.0
    reconnect_max: float = 120.0
    subscriptions: tuple[str, ...] = ()  # QoS 1, made again on every connection
    will: tuple[str, bytes] | None = None  # (topic, payload), retained, QoS 1


@dataclass
class DeviceMqtt:
    """One paho client with a persistent session; messages go to `on_message` as `Received`, unacknowledged.

    `on_connected(session_present)` runs on paho's network thread after the subscriptions are
    made again: keep it tiny. Acknowledge each message with `ack()` once it is handled.
    """

    settings: MqttSettings
    on_message: Callable[[Received], None]
    on_connected: Callable[[bool], None] = lambda session_present: None
    connected: threading.Event = field(default_factory=threading.Event)
    # Set when the broker refused the device's credentials: reconnecting stops.
    credentials_refused: threading.Event = field(default_factory=threading.Event)
    reconnect_attempts: int = 0
    stopping: bool = False

    def __post_init__(self):
        self.client = self._make_client()
        self._jitter_next_reconnect()

    def _make_client(self) -> paho.Client:
        settings = self.settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
        if settings.username:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(ca_certs=settings.ca_file)
        if settings.will is not None:
            topic, payload = settings.will
            client.will_set(topic, payload, qos=1, retain=True)
        client.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        client.on_socket_open = _nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = lambda *_: self._jitter_next_reconnect()
        return client

    # --- the session ------------------------------------------------------------

    def start(self):
        """Connect in the background (and keep reconnecting); returns at once."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive,
                                  clean_start=False, properties=properties)
        self.client.loop_start()

    def stop(self):
        self.stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation: bytes | None = None) -> paho.MQTTMessageInfo:
        """Queue a publication; `correlation` becomes its CorrelationData (a command result names its command)."""
        properties = None
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def ack(self, message: Received):
        """Acknowledge a handled message: until then the broker keeps it and delivers it again."""
        if message.qos > 0:
            self.client.ack(message.mid, message.qos)

    # --- paho's callbacks (network thread: tiny, never raising) ---------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if reason_code.value in (BAD_CREDENTIALS, NOT_AUTHORIZED):
                self._give_up_on_credentials(reason_code)
            else:
                log.error("broker refused the connection: %s", reason_code)
            return
        self.connected.set()
        self.reconnect_attempts = 0
        if self.settings.subscriptions:
            client.subscribe([(topic, 1) for topic in self.settings.subscriptions])
        try:
            self.on_connected(flags.session_present)
        except Exception:  # must never kill the network loop
            log.exception("handling the connection failed")

    def _give_up_on_credentials(self, reason_code):
        """Say once that the device's account is gone, and stop reconnecting: retrying cannot help."""
        if self.credentials_refused.is_set():
            return
        self.credentials_refused.set()
        log.error("the broker refused this device's credentials (%s): the device was deleted on the server "
                  "or its credentials were revoked. Register it again with `fleet-device register`; "
                  "not reconnecting. client_id=%s", reason_code, self.settings.client_id)
        self.client.disconnect()  # ends paho's reconnection loop

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self._jitter_next_reconnect()
        if not self.stopping and not self.credentials_refused.is_set():
            log.warning("disconnected from broker: %s; reconnecting", reason_code)

    def _on_message(self, client, userdata, message):
        try:
            self.on_message(Received.of(message))
        except Exception:  # must never kill the network loop; unacknowledged, the broker delivers it again
            log.exception("receiving a message on %s failed", message.topic)

    def _jitter_next_reconnect(self):
        """Choose the wait before paho's next connection attempt: uniform over a doubling window.

        A broker restart drops the whole fleet at the same instant. paho's own backoff
        (fixed start, doubling) brings it back in synchronised waves; a uniform draw over
        the whole window ("full jitter") spreads the reconnections evenly instead.
        """
        self.reconnect_attempts += 1
        window = min(self.settings.reconnect_max,
                     self.settings.reconnect_window * 2 ** (self.reconnect_attempts - 1))
        delay = random.uniform(min(1.0, window), window)
        # paho waits min_delay before its next attempt (reconnect_delay_set resets its doubling).
        self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)


def _nodelay(client, userdata, sock):
    # Without it a QoS 1 round trip waits on Nagle's algorithm for tens of milliseconds.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass
