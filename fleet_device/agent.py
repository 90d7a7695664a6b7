"""The device agent: keeps an MQTT v5 session, queues the releases it receives, applies them on request."""
from __future__ import annotations

import logging
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import __version__, logbuffer, wire
from .deploy import Deployer, DeployError
from .execution import CommandRunner
from .state import ReleaseQueue

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    unit_id: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    state_dir: Path = Path("/var/lib/fleet-device")
    api_host: str = "127.0.0.1"
    api_port: int = 9000
    minion_id_file: Path | None = Path("/etc/salt/minion_id")
    settle_seconds: float = 10.0
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30


@dataclass
class Outcome:
    project_id: int
    release_id: int | None
    state: str
    step: str | None = None
    detail: str = ""

    def as_dict(self):
        return {
            "project_id": self.project_id,
            "release_id": self.release_id,
            "state": self.state,
            "step": self.step,
            "detail": self.detail,
        }


class Agent:
    def __init__(self, config: AgentConfig, deployer: Deployer | None = None):
        self.config = config
        self.unit_id = config.unit_id
        self.queue = ReleaseQueue(config.state_dir)
        self.deployer = deployer or Deployer(config.unit_id, settle_seconds=config.settle_seconds)
        self.inbox: queue.Queue = queue.Queue(maxsize=1000)
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.apply_lock = threading.Lock()
        self.rejected = 0
        # Topic kind → handler(where, message). Each feature adds its own entry.
        self.handlers = {"releases": self._handle_release}
        self.subscriptions = [wire.release_subscription(self.unit_id)]
        # Remote commands: run at most once each, off this thread, results kept until acknowledged.
        self.recent_logs = logbuffer.install()
        self.command_runner = CommandRunner(self, Path(config.state_dir) / "commands")
        self.handlers["commands"] = self.command_runner.handle_message
        self.subscriptions.append(wire.device_topic(self.unit_id, "commands"))
        self.client = self._make_client()

    # --- MQTT -------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fleet-device-{self.unit_id}",
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.broker_tls:
            client.tls_set(ca_certs=self.config.ca_file)
        client.will_set(
            wire.device_topic(self.unit_id, "status"),
            wire.encode(wire.status_message, {"state": "offline", "agent_version": __version__}),
            qos=1,
            retain=True,
        )
        client.max_queued_messages_set(10000)
        client.on_socket_open = _nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self.command_runner.published
        # Spread reconnects after a broker restart so a fleet does not return in one burst.
        client.reconnect_delay_set(min_delay=1 + random.random(), max_delay=30 + random.random() * 30)
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self.connected.set()
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        self.publish_status("online")
        self.command_runner.connected()
        log.info("connected unit_id=%s session_present=%s", self.unit_id, flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("disconnected from broker: %s; reconnecting", reason_code)

    def _on_message(self, client, userdata, message):
        # Tiny on purpose: the network loop must never block or die here.
        try:
            self.inbox.put_nowait(message)
        except queue.Full:
            log.error("inbox full; dropping unacknowledged message topic=%s (the broker redelivers)", message.topic)

    def publish(self, kind: str, schema, body: dict, retain=False):
        payload = wire.encode(schema, body)
        return self.client.publish(wire.device_topic(self.unit_id, kind), payload, qos=1, retain=retain)

    def publish_status(self, state: str):
        return self.publish("status", wire.status_message, {"state": state, "agent_version": __version__, "ts": time.time()},
                     retain=True)

    def report(self, message: dict, state: str, step: str | None = None, detail: str = ""):
        release = message["release"]
        if release is None:
            return  # a tombstone has no release to report on
        body = {
            "project_id": message["project_id"],
            "release_id": release["id"],
            "version_hash": release["version_hash"],
            "state": state,
            "step": step,
            "detail": detail[:4000],
            "ts": time.time(),
        }
        log.info("release=%s project=%s state=%s step=%s %s", release["id"], message["project_id"], state, step, detail)
        self.publish("deployments", wire.deployment_report, body)

    # --- handling messages ------------------------------------------------------

    def _handle(self, message):
        try:
            where = wire.parse_topic(message.topic)
            handler = self.handlers.get(where.kind) if where.unit_id == self.unit_id else None
            if handler is None:
                raise wire.WireError(f"not a topic this device handles: {message.topic}")
            handler(where, message)
        except wire.WireError as exc:
            self.rejected += 1
            log.warning("rejected message topic=%s reason=%s", message.topic, exc)
        except Exception:
            self.rejected += 1
            log.exception("failed to handle message topic=%s", message.topic)
        # Acknowledge only now: the release is on disk (or the message is worthless).
        if message.qos > 0:
            self.client.ack(message.mid, message.qos)

    def _handle_release(self, where: wire.DeviceTopic, message):
        if message.payload == b"":
            log.info("release topic of project %s cleared", where.project_id)
            return
        self._receive_release(where.project_id, wire.decode(wire.release_message, message.payload))

    def _receive_release(self, project_id: int, message: dict):
        if message["project_id"] != project_id:
            raise wire.WireError(f"payload names project {message['project_id']} on project {project_id}'s topic")
        if self.queue.put(message):
            if message["release"] is not None:
                self.report(message, "queued")
            log.info("queued project=%s release=%s", project_id, (message["release"] or {}).get("id"))
        elif message["release"] is not None and self.queue.queued(project_id) is None:
            # Redelivered after a reconnect: say again that it runs, in case that report was lost.
            self.report(message, "succeeded", "verify", "already running")

    # --- applying ---------------------------------------------------------------

    def apply_queued(self) -> list[Outcome]:
        """Apply every queued release now, one project after another."""
        outcomes = []
        with self.apply_lock:
            for message in self.queue.pending():
                outcomes.append(self._apply(message))
        return outcomes

    def _apply(self, message: dict) -> Outcome:
        project_id, release = message["project_id"], message["release"]
        release_id = release["id"] if release else None
        registries = {r["id"]: r for r in message.get("registries", [])}
        self.deployer.report = lambda state, step=None, detail="": self.report(message, state, step, detail)
        self.report(message, "started")
        try:
            self.deployer.apply(project_id, release, registries)
        except DeployError as exc:
            self.queue.mark_applied(message, succeeded=False)
            self.report(message, "failed", exc.step, exc.reason)
            return Outcome(project_id, release_id, "failed", exc.step, exc.reason)
        except Exception as exc:  # the engine went away, a bug: never leave the agent dead
            log.exception("deploy of project %s crashed", project_id)
            self.queue.mark_applied(message, succeeded=False)
            self.report(message, "failed", "engine", str(exc))
            return Outcome(project_id, release_id, "failed", "engine", str(exc))
        self.queue.mark_applied(message, succeeded=True)
        self.report(message, "succeeded", "verify")
        return Outcome(project_id, release_id, "succeeded")

    # --- running ------------------------------------------------------------------

    def start(self):
        """Connect and start the message thread; returns at once."""
        if self.config.minion_id_file:
            _write_unit_id(self.config.minion_id_file, self.unit_id)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry
        self.client.connect_async(
            self.config.broker_host,
            self.config.broker_port,
            keepalive=self.config.keepalive,
            clean_start=False,
            properties=properties,
        )
        self.client.loop_start()
        self.command_runner.start()
        self._thread = threading.Thread(target=self._work, name="agent-messages", daemon=True)
        self._thread.start()

    def _work(self):
        while not self.stopping.is_set():
            try:
                message = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._handle(message)

    def stop(self):
        self.stopping.set()
        self.command_runner.stop()
        if self.connected.is_set():
            try:
                self.publish_status("offline").wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def _nodelay(client, userdata, sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _write_unit_id(path: Path, unit_id: str):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text().strip() != unit_id:
            path.write_text(unit_id + "\n")
    except OSError as exc:
        log.warning("could not write the unit id to %s: %s", path, exc)
