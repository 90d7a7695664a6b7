"""A client of Mosquitto's dynamic security plugin: JSON commands on `$CONTROL/dynamic-security/v1`.

The plugin answers every command batch on `.../response`, each answer carrying the
`correlationData` of its command, so several threads may wait on one connection.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading

import paho.mqtt.client as paho

from ..messaging.mqtt import new_client

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"


class BrokerAccountError(Exception):
    """The broker did not do what was asked (unreachable, refused, or answered with an error)."""


class CommandFailed(BrokerAccountError):
    def __init__(self, command: str, error: str):
        super().__init__(f"broker refused {command}: {error}")
        self.command = command
        self.error = error


class DynSecControl:
    """One MQTT connection, as the dynsec admin account, sending commands and waiting for answers."""

    def __init__(self, host: str, port: int, username: str, password: str, *, tls: bool = False,
                 ca_file: str | None = None, timeout: float = 5.0, client_id: str | None = None):
        self.timeout = timeout
        self._pending: dict[str, dict] = {}
        self._answered = threading.Condition()
        self._ready = threading.Event()
        self._refused: str | None = None
        self._address = (host, port)
        self.client = new_client(client_id or f"fleet-dynsec-{secrets.token_hex(4)}", username=username,
                                 password=password, tls=tls, ca_file=ca_file, reconnect_max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *args: self._ready.clear()
        self._started = False
        self._start_lock = threading.Lock()

    # paho callbacks: tiny, they only record what arrived.
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("broker refused the dynsec admin connection: %s", reason_code)
            return
        self._refused = None
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(code.is_failure for code in reason_codes):
            self._refused = f"subscription to {RESPONSE_TOPIC} refused: {reason_codes}"
            log.error("%s", self._refused)
            return
        self._ready.set()

    def _on_message(self, client, userdata, message):
        try:
            responses = json.loads(message.payload)["responses"]
            with self._answered:
                for response in responses:
                    key = response.get("correlationData")
                    if key in self._pending:
                        self._pending[key] = response
                self._answered.notify_all()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring a malformed dynsec response: %s", exc)

    def _ensure_connected(self):
        with self._start_lock:
            if not self._started:
                self.client.connect_async(*self._address, keepalive=30)
                self.client.loop_start()
                self._started = True
        if not self._ready.wait(self.timeout):
            reason = self._refused or "no answer"
            raise BrokerAccountError(f"cannot reach the broker's dynamic security control at "
                                     f"{self._address[0]}:{self._address[1]}: {reason}")

    def run(self, *commands: dict, ignore: tuple[str, ...] = ()) -> list[dict]:
        """Send commands as one batch; CommandFailed for an error not listed in `ignore`."""
        self._ensure_connected()
        keyed = []
        with self._answered:
            for command in commands:
                key = secrets.token_hex(8)
                self._pending[key] = {}
                keyed.append((key, {**command, "correlationData": key}))
        try:
            info = self.client.publish(CONTROL_TOPIC, json.dumps({"commands": [c for _, c in keyed]}), qos=1)
            with self._answered:
                done = self._answered.wait_for(lambda: all(self._pending[k] for k, _ in keyed), self.timeout)
                answers = [self._pending[k] for k, _ in keyed]
            if not done or info.rc != paho.MQTT_ERR_SUCCESS:
                raise BrokerAccountError(
                    f"the broker did not answer {', '.join(c['command'] for _, c in keyed)} within {self.timeout:.0f} s"
                )
        finally:
            with self._answered:
                for key, _ in keyed:
                    self._pending.pop(key, None)
        for (_, command), answer in zip(keyed, answers):
            error = answer.get("error")
            if error and not any(text in error for text in ignore):
                raise CommandFailed(command["command"], error)
        return answers

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
