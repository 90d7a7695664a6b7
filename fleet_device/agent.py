"""The device agent: keeps an MQTT v5 session, queues the releases it receives, applies them on request."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec

import fleet_wire as wire
from fleet_wire.release_policy import ReleasePolicy


from . import __version__, logbuffer
from .commands import CommandContext, CommandRunner, ContainerScope
from .deploy import Deployer, DeployError, Recovery, release_image_refs
from .mqtt import DeviceMqtt, MqttSettings, Received
from .pending_reports import DEFAULT_LIMIT, DEFAULT_RESEND_INTERVAL, PendingReports
from .state import RegistryStore, ReleaseQueue
from .telemetry import Telemetry, TelemetryConfig

log = logging.getLogger(__name__)

# Messages received and not yet handled; past this the broker keeps (and redelivers) the rest.
INBOX_LIMIT = 1000


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
    health_timeout: float = 60.0
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30
    # After losing the broker, the first reconnection attempt falls anywhere in this many
    # seconds; each failed attempt doubles the window, up to reconnect_max.
    reconnect_window: float = 12.0
    reconnect_max: float = 120.0
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # The containers commands may act on: Fleet's own unless the device allows more.
    container_scope: ContainerScope = field(default_factory=ContainerScope)
    # What a release may hold (privileged mode, binds...); a release asking for more is refused.
    release_policy: ReleasePolicy = ReleasePolicy()
    # Reports the server has not confirmed are sent again this often (and after each reconnect);
    # at most pending_reports_limit deployment reports are kept (see pending_reports.py).
    report_resend_interval: float = DEFAULT_RESEND_INTERVAL
    pending_reports_limit: int = DEFAULT_LIMIT


@dataclass
class Outcome:
    project_id: int
    release_id: int | None
    state: str
    step: str | None = None
    detail: str = ""
    # False while a rolled-back deploy could not be fully undone (the engine is away): not safe to sleep.
    settled: bool = True

    def as_dict(self):
        return {
            "project_id": self.project_id,
            "release_id": self.release_id,
            "state": self.state,
            "step": self.step,
            "detail": self.detail,
            "settled": self.settled,
        }


class Agent:
    def __init__(self, config: AgentConfig, deployer: Deployer | None = None):
        self.config = config
        self.unit_id = config.unit_id
        self.queue = ReleaseQueue(config.state_dir)
        self.registries = RegistryStore(config.state_dir)
        self.deployer = deployer or Deployer(config.unit_id, config.state_dir, settle_seconds=config.settle_seconds,
                                             health_timeout=config.health_timeout, policy=config.release_policy)
        # A SimpleQueue (C, one lock) wakes the message thread sooner and for less CPU than
        # queue.Queue; its bound is kept by `_on_message`, the only producer.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.apply_lock = threading.Lock()
        self.rejected = 0
        self.stale_logged: set[tuple[int, int]] = set()  # older release documents already logged as ignored
        self.subscriptions = [wire.release_subscription(self.unit_id), wire.device_topic(self.unit_id, "commands"),
                              wire.device_topic(self.unit_id, "confirmations")]
        self.mqtt = self._make_mqtt()
        self.connected = self.mqtt.connected
        # Set when the broker refused the device's credentials: the agent stops trying.
        self.credentials_refused = self.mqtt.credentials_refused
        # Topic kind → handler(where, message). Each feature adds its own entry.
        self.handlers = {"releases": self._handle_release}
        # Remote commands: run at most once each, off this thread, results kept until acknowledged.
        self.recent_logs = logbuffer.install()
        self.command_runner = CommandRunner(self._command_context(), self.mqtt, Path(config.state_dir) / "commands")
        self.handlers["commands"] = self.command_runner.handle_message
        self.command_runner.resend_interval = config.report_resend_interval
        # Reports are kept until the server confirms it stored them, and sent again until then.
        self.pending_reports = PendingReports(Path(config.state_dir) / "reports", self._publish_payload,
                                              limit=config.pending_reports_limit,
                                              resend_interval=config.report_resend_interval)
        self._reconnected_at: float | None = None  # monotonic; set by _on_connected, taken by resend_reports
        self.handlers["confirmations"] = self._handle_confirmations
        self.telemetry = Telemetry(config.unit_id, config.state_dir, self.mqtt, self.connected,
                                   replace(config.telemetry, confirm_timeout=config.report_resend_interval))

    # --- MQTT -------------------------------------------------------------------

    def _make_mqtt(self) -> DeviceMqtt:
        config = self.config
        will = (wire.device_topic(self.unit_id, "status"),
                wire.encode(wire.Status(state="offline", agent_version=__version__)))
        settings = MqttSettings(
            client_id=f"fleet-device-{self.unit_id}", host=config.broker_host, port=config.broker_port,
            tls=config.broker_tls, ca_file=config.ca_file, username=config.username, password=config.password,
            keepalive=config.keepalive, session_expiry=config.session_expiry,
            reconnect_window=config.reconnect_window, reconnect_max=config.reconnect_max,
            subscriptions=tuple(self.subscriptions), will=will)
        return DeviceMqtt(settings, on_message=self._on_message, on_connected=self._on_connected)

    def _command_context(self) -> CommandContext:
        return CommandContext(self.unit_id, docker=lambda: self.deployer.client, recent_logs=self.recent_logs,
                              releases=self.queue, apply_queued=self.apply_queued,
                              container_scope=self.config.container_scope)

    def _on_connected(self, session_present: bool):
        # A restarted broker may have dropped what it acknowledged: every unconfirmed report sent
        # before this moment goes again (from the message thread: this callback stays small).
        self._reconnected_at = time.monotonic()
        self.publish_status("online")
        self.telemetry.reconnected()
        self.command_runner.connected()
        log.info("connected unit_id=%s session_present=%s", self.unit_id, session_present)

    def _on_message(self, message: Received):
        # Tiny on purpose: the network loop must never block or die here.
        if self.inbox.qsize() >= INBOX_LIMIT:
            log.error("inbox full; dropping unacknowledged message topic=%s (the broker redelivers)", message.topic)
            return
        self.inbox.put(message)

    def publish(self, kind: str, message: wire.Message, retain=False):
        return self._publish_payload(kind, wire.encode(message), retain)

    def _publish_payload(self, kind: str, payload: bytes, retain: bool):
        return self.mqtt.publish(wire.device_topic(self.unit_id, kind), payload, qos=1, retain=retain)

    def publish_status(self, state: str):
        # Kept until confirmed, in memory only: a restarted agent says it is online anyway.
        return self.pending_reports.send("status", {"state": state, "agent_version": __version__, "ts": time.time()},
                                         slot="status", durable=False)

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
        self.pending_reports.send("deployments", body)

    def resend_reports(self):
        """Send again the reports the server has not confirmed: all after a reconnect, else those due."""
        if not self.connected.is_set():
            return 0
        reconnected_at, self._reconnected_at = self._reconnected_at, None
        return self.pending_reports.resend(reconnected_at)

    def _handle_confirmations(self, where: wire.DeviceTopic, message):
        ids = wire.decode(wire.Confirmation, message.payload).ids
        confirmed = self.pending_reports.confirm(ids)
        self.telemetry.confirm(ids)
        self.command_runner.confirmed(ids)
        log.debug("server confirmed %d report(s), %d of them deployment reports or status", len(ids), confirmed)

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
        self.mqtt.ack(message)

    def _handle_release(self, where: wire.DeviceTopic, message):
        if message.payload == b"":
            log.info("release topic of project %s cleared", where.project_id)
            return
        release = wire.decode(wire.ReleaseMessage, message.payload)
        # The queue, its journal on disk and the deployer keep a release as plain values.
        self._receive_release(where.project_id, msgspec.to_builtins(release))

    def _receive_release(self, project_id: int, message: dict):
        if message["project_id"] != project_id:
            raise wire.WireError(f"payload names project {message['project_id']} on project {project_id}'s topic")
        if not self._release_is_current(message):
            return
        if message["registries"]:
            # Kept for the login at the next start-up, whatever becomes of this release.
            self.registries.remember(message["registries"])
        if self.queue.put(message):
            if message["release"] is not None:
                self.report(message, "queued")
            log.info("queued project=%s release=%s", project_id, (message["release"] or {}).get("id"))
        elif message["release"] is not None and self.queue.queued(project_id) is None:
            # Redelivered after a reconnect: say again that it runs, in case that report was lost.
            self.report(message, "succeeded", "verify", "already running")

    def _release_is_current(self, message: dict) -> bool:
        """False for a document older than one already seen for its project (a lower seq): ignored."""
        project_id, seq = message["project_id"], message.get("seq")
        if self.queue.accept_seq(project_id, seq):
            return True
        if (project_id, seq) not in self.stale_logged:  # a broker replays it at every reconnection
            self.stale_logged.add((project_id, seq))
            log.warning("ignored an older release document project=%s seq=%s highest=%s release=%s",
                        project_id, seq, self.queue.highest_seq(project_id), (message["release"] or {}).get("id"))
        return False

    # --- applying ---------------------------------------------------------------

    def apply_queued(self, budget: float | None = None) -> list[Outcome]:
        """Apply every queued release now, one project after another.

        With a budget (seconds), no deploy starts once it is spent; one already started is
        finished (or rolled back) first. What is left stays queued and is reported as such.
        """
        deadline = None if budget is None else time.monotonic() + budget
        with self.apply_lock:
            outcomes = self._recover()
            for message in self.queue.pending():
                if deadline is not None and time.monotonic() >= deadline:
                    release = message["release"]
                    outcomes.append(Outcome(message["project_id"], release["id"] if release else None, "queued",
                                            None, "the sleep budget was spent; applied at the next sleep"))
                    continue
                outcomes.append(self._apply(message))
        return outcomes

    def _apply(self, message: dict) -> Outcome:
        project_id, release = message["project_id"], message["release"]
        release_id = release["id"] if release else None
        if not self._settled(project_id):
            # An earlier deploy could not be rolled back completely; it must be resolved first.
            return Outcome(project_id, release_id, "failed", "recover",
                           "an interrupted deploy of this project is still being rolled back", settled=False)
        registries = {**self.registries.all(), **{r["id"]: r for r in message.get("registries", [])}}
        self.deployer.report = lambda state, step=None, detail="": self.report(message, state, step, detail)
        self.report(message, "started")
        try:
            steps = self.deployer.apply(
                project_id, release, registries,
                previous=self.queue.applied(project_id),
                needed_elsewhere=self._images_needed_elsewhere(project_id, registries),
                context=message,
            )
        except DeployError as exc:
            if exc.step == "engine":
                # Nothing was tried: the release stays queued for the next trigger.
                self.report(message, "failed", exc.step, exc.reason + "; still queued")
                return Outcome(project_id, release_id, "failed", exc.step, exc.reason)
            return self._record(message, Outcome(project_id, release_id, "failed", exc.step, exc.reason,
                                                 settled=self._settled(project_id)))
        except Exception as exc:  # a bug: never leave the agent dead
            log.exception("deploy of project %s crashed", project_id)
            return self._record(message, Outcome(project_id, release_id, "failed", "engine", str(exc),
                                                 settled=self._settled(project_id)))
        detail = "already running" if not steps else f"{len(steps)} steps"
        return self._record(message, Outcome(project_id, release_id, "succeeded", "verify", detail))

    def _settled(self, project_id: int) -> bool:
        return self.deployer.settled(project_id)

    def _record(self, message: dict, outcome: Outcome) -> Outcome:
        """Make the outcome durable (applied release, queue), then drop the journal, then report."""
        self.queue.mark_applied(message, succeeded=outcome.state == "succeeded")
        self.deployer.forget(outcome.project_id)
        self.report(message, outcome.state, outcome.step, outcome.detail)
        return outcome

    def _images_needed_elsewhere(self, project_id: int, registries: dict[int, dict]) -> frozenset[str]:
        """Images the other projects' applied and queued releases use: never pruned for this one."""
        releases = [r for pid, r in self.queue.applied_releases().items() if pid != project_id]
        releases += [m["release"] for m in self.queue.pending() if m["project_id"] != project_id]
        return frozenset(ref for release in releases for ref in release_image_refs(release, registries))

    def _recover(self) -> list[Outcome]:
        """Finish or roll back deploys a crash interrupted (journal in the state dir)."""
        outcomes = []
        try:
            recoveries = self.deployer.recover()
        except Exception:
            log.exception("recovering interrupted deploys failed; retried at the next apply")
            return outcomes
        for recovery in recoveries:
            outcomes.append(self._record_recovery(recovery))
        return outcomes

    def _record_recovery(self, recovery: Recovery) -> Outcome:
        message = recovery.context or {"project_id": recovery.project_id, "release": None}
        release = message.get("release")
        outcome = Outcome(recovery.project_id, release["id"] if release else None, recovery.state, recovery.step,
                          recovery.detail, settled=recovery.settled)
        log.info("recovered project=%s state=%s %s", recovery.project_id, recovery.state, recovery.detail)
        if not recovery.settled:
            self.report(message, "failed", recovery.step, recovery.detail)
            return outcome
        return self._record(message, outcome)

    def start_up(self):
        """Log in to every registry the device knows and resolve interrupted deploys."""
        with self.apply_lock:
            try:
                failures = self.deployer.login_all(self.registries.all())
            except Exception as exc:  # the engine is away: pulls log in again anyway
                log.warning("registry logins at start-up skipped: %s", exc)
                failures = {}
            for host, reason in failures.items():
                log.warning("registry %s: %s", host, reason)
            self._recover()

    # --- running ------------------------------------------------------------------

    def start(self):
        """Connect and start the message thread; returns at once."""
        if self.config.minion_id_file:
            _write_unit_id(self.config.minion_id_file, self.unit_id)
        self.mqtt.start()
        self.command_runner.start()
        self._thread = threading.Thread(target=self._work, name="agent-messages", daemon=True)
        self._thread.start()
        self.telemetry.start()

    def _work(self):
        self.start_up()
        next_resend = 0.0
        while not self.stopping.is_set():
            if self._reconnected_at is not None or time.monotonic() >= next_resend:
                try:
                    self.resend_reports()
                except Exception:  # a bug must not stop the agent from handling messages
                    log.exception("resending unconfirmed reports failed")
                next_resend = time.monotonic() + min(1.0, self.config.report_resend_interval)
            try:
                message = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._handle(message)

    def stop(self):
        self.stopping.set()
        self.telemetry.stop()
        self.command_runner.stop()
        if self.connected.is_set():
            try:
                self.publish_status("offline").wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        self.mqtt.stop()


def _write_unit_id(path: Path, unit_id: str):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text().strip() != unit_id:
            path.write_text(unit_id + "\n")
    except OSError as exc:
        log.warning("could not write the unit id to %s: %s", path, exc)
