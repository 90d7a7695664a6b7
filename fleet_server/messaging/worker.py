"""The ingest worker: consumes device reports through a shared subscription and sweeps the outbox.

Any number of workers can run against one database and broker; the broker hands each
report to one of them. A worker that dies for good has its session drained by a live
one (see worker_sessions.py), so its share of the reports is stored all the same.
"""
import enum
import logging
import queue
import signal
import socket
import threading
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

import fleet_wire as wire

from .. import broker_accounts
from ..commands import service as commands
from ..config import mqtt_endpoint
from ..deadletters import service as deadletters
from ..extensions import db
from ..models import Device
from . import ingest, outbox, worker_sessions
from .mqtt import connect, connect_session, end_session, make_client, publish_and_wait, publish_many

log = logging.getLogger(__name__)

SESSION_EXPIRY = 24 * 3600  # reports wait on the broker this long while every worker is down


def client_id_for(worker_id: str) -> str:
    return f"fleet-worker-{worker_id}"


BATCH_LIMIT = 500  # reports stored per transaction at most; the broker's in-flight window bounds it too


class Outcome(enum.Enum):
    STORED = "stored"
    # Not stored (malformed, refused by the database, a bug) and kept as a dead letter; acknowledged
    # all the same: redelivered it would fail again, and enough of them would fill the session's
    # in-flight window and stop every other report.
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"  # the database is down: not acknowledged, tried again later


def database_unavailable(error: Exception) -> bool:
    """Whether `error` says the database cannot be reached (then a report waits), not that it refuses the report."""
    return isinstance(error, (OperationalError, InterfaceError)) or bool(
        isinstance(error, DBAPIError) and error.connection_invalidated)


def store_reports(app, messages) -> list[Outcome]:
    """Store device messages [(topic, payload)] in one transaction; one Outcome each.

    If the batch fails on anything but an outage (a message the database refuses, a bug),
    its messages are stored one by one, so that only the culprit is refused. What is refused
    is kept as a dead letter, in a transaction of its own.
    """
    with app.app_context():
        try:
            reasons = ingest.store_batch(messages)
            return _keep_dead_letters(messages, reasons)
        except Exception as exc:
            db.session.rollback()
            if database_unavailable(exc):
                log.exception("database unavailable; %d message(s) left unacknowledged", len(messages))
                return [Outcome.UNAVAILABLE] * len(messages)
            log.exception("storing a batch of %d message(s) failed; storing them one by one", len(messages))
        finally:
            db.session.remove()
        reasons = []
        for topic, payload in messages:
            if reasons and reasons[-1] is Outcome.UNAVAILABLE:
                reasons.append(Outcome.UNAVAILABLE)
                continue
            try:
                reasons.append(ingest.store_batch([(topic, payload)])[0])
            except Exception as exc:
                db.session.rollback()
                if database_unavailable(exc):
                    log.exception("database unavailable; message left unacknowledged topic=%s", topic)
                    reasons.append(Outcome.UNAVAILABLE)
                else:
                    log.exception("could not store a message topic=%s; keeping it as a dead letter", topic)
                    reasons.append(f"storing it failed: {type(exc).__name__}: {exc}")
            finally:
                db.session.remove()
        try:
            return _keep_dead_letters(messages, reasons)
        finally:
            db.session.remove()


def _keep_dead_letters(messages, reasons) -> list[Outcome]:
    """The outcome of each message given its verdict (None: stored), once the refused ones are dead letters."""
    letters = [deadletters.Letter(topic, payload, reason) for (topic, payload), reason in zip(messages, reasons)
               if isinstance(reason, str)]
    if not letters:
        return [Outcome.STORED if reason is None else reason for reason in reasons]
    try:
        deadletters.record(letters)
        refused = Outcome.REJECTED
    except Exception as exc:
        db.session.rollback()
        if database_unavailable(exc):
            log.exception("database unavailable; %d dead letter(s) left unacknowledged", len(letters))
            refused = Outcome.UNAVAILABLE  # sent again, refused again, and then kept
        else:  # a bug: the report is lost rather than left to block the session
            log.exception("%d dead letter(s) could not be kept; acknowledged all the same: %s", len(letters),
                          "; ".join(f"topic={letter.topic} reason={letter.reason}" for letter in letters[:10]))
            refused = Outcome.REJECTED
    return [Outcome.STORED if reason is None else refused if isinstance(reason, str) else reason
            for reason in reasons]


# What the device may stop resending: everything but what waits to be stored again.
_UNSETTLED = (Outcome.UNAVAILABLE,)


def confirmations(messages, outcomes) -> dict[str, list[str]]:
    """{unit_id: [report ids]} of the stored (or refused for good) reports among `messages`.

    `messages` are (topic, payload, ...) in the order of `outcomes`. A report without an id
    (an older agent's) or on a topic that names no device needs no confirmation.
    """
    confirmed: dict[str, list[str]] = {}
    for (topic, payload, *_delivery), outcome in zip(messages, outcomes):
        if outcome in _UNSETTLED:
            continue
        try:
            where = wire.parse_topic(topic)
        except wire.WireError:
            continue
        report_id = wire.confirmation_id(where.kind, payload)
        if report_id is not None:
            confirmed.setdefault(where.unit_id, []).append(report_id)
    return confirmed


def publish_confirmations(client, messages, outcomes) -> int:
    """Tell each device which of its reports the batch settled: one message per device (QoS 1,
    not retained), sent after the commit and not waited for. A lost confirmation only makes the
    device send the report again, which stores nothing new. Returns how many were published."""
    published = 0
    if not client.is_connected():
        return published
    for unit_id, ids in confirmations(messages, outcomes).items():
        for start in range(0, len(ids), wire.MAX_CONFIRMED_IDS):
            try:
                payload = wire.encode(wire.Confirmation(ids=ids[start:start + wire.MAX_CONFIRMED_IDS]))
            except wire.WireError as exc:  # an id the contract does not allow: the device resends, harmlessly
                log.warning("cannot confirm reports of unit_id=%s: %s", unit_id, exc)
                continue
            client.publish(wire.device_topic(unit_id, "confirmations"), payload, qos=1)
            published += 1
    return published


class IngestWorker:
    def __init__(self, app, worker_id: str | None = None, sweep_interval: float = 1.0,
                 heartbeat_file: Path | None = None):
        self.app = app
        self.worker_id = worker_id or socket.gethostname()
        self.client_id = client_id_for(self.worker_id)
        self.sweep_interval = sweep_interval
        self.heartbeat_file = heartbeat_file
        self.adopt_after = app.config["FLEET_WORKER_ADOPT_AFTER"]
        self.inbox: queue.Queue = queue.Queue(maxsize=10000)
        self.stopping = threading.Event()
        self.received = self.rejected = 0
        # Reports not stored because the database was down: still unacknowledged, tried again first.
        self.retry: list = []
        self.retry_at = 0.0
        self.retry_delay = 0.0
        # A packet id only means something on the connection that delivered it: after a
        # reconnection the broker resends what was not acknowledged, and acknowledging an
        # old id could acknowledge a different, unstored message.
        self.connection = 0
        self.drains: dict[str, threading.Thread] = {}
        # The connection whose broker was found holding every release published (see _check_broker_state),
        # and the release seq marker this worker last wrote or found there.
        self.verified_connection = 0
        self.marker_written = 0
        self.marker_check_failed_on = 0  # the connection on which a failed check was last logged
        # A stable client id per worker keeps its session (and the reports queued in it)
        # across restarts.
        self.client = make_client(app.config, self.client_id, persistent=True, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the worker: %s", reason_code)
            return
        self.connection += 1
        group = self.app.config["FLEET_MQTT_GROUP"]
        client.subscribe([(wire.shared_subscription(kind, group), 1) for kind in ingest.KINDS])
        log.info("worker %s connected and subscribed", self.worker_id)

    def _on_message(self, client, userdata, message):
        # Tiny on purpose: the network loop must never block or die here.
        try:
            self.inbox.put((message.topic, message.payload, message.mid, message.qos, self.connection), timeout=5)
        except queue.Full:
            log.error("worker inbox full; message will be redelivered topic=%s", message.topic)

    def _next_batch(self, wait: float) -> list:
        """What waits to be stored: the reports to retry, then whatever the inbox already holds.

        Waits (at most `wait`) only for the first report: a lone report is stored at once,
        and under load a batch is whatever arrived while the previous one was being stored.
        """
        if self.retry:
            if time.monotonic() < self.retry_at:
                self.stopping.wait(min(wait, self.retry_at - time.monotonic()))
                return []
            batch, self.retry = self.retry, []
        else:
            try:
                batch = [self.inbox.get(timeout=wait)]
            except queue.Empty:
                return []
        while len(batch) < BATCH_LIMIT:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _handle(self, batch):
        outcomes = store_reports(self.app, [(topic, payload) for topic, payload, *_delivery in batch])
        retry = []
        for (topic, payload, mid, qos, connection), outcome in zip(batch, outcomes):
            if connection != self.connection:
                continue  # delivered on an earlier connection: the broker has sent it again since
            if outcome is Outcome.UNAVAILABLE:
                retry.append((topic, payload, mid, qos, connection))
                continue
            # Acknowledged only now that the transaction holding it is committed.
            self.received += 1
            self.rejected += outcome is Outcome.REJECTED
            if qos > 0:
                self.client.ack(mid, qos)
        publish_confirmations(self.client, batch, outcomes)
        if retry:
            self.retry = retry
            self.retry_delay = min(10.0, max(0.5, self.retry_delay * 2))
            self.retry_at = time.monotonic() + self.retry_delay
            log.warning("%d report(s) wait for the database; next attempt in %.1f s", len(retry), self.retry_delay)
        else:
            self.retry_delay = 0.0

    def _sweep(self):
        with self.app.app_context():
            try:
                worker_sessions.heartbeat(self.client_id, self.worker_id)
                self._adopt_orphans()
                self._check_broker_state()
                outbox.flush(lambda messages: publish_many(self.client, messages, retain=True))
                self._write_marker()
            except Exception:
                log.exception("outbox sweep failed")
                db.session.rollback()
            try:
                commands.publish_pending(
                    lambda topic, payload, request: publish_and_wait(self.client, topic, payload, request=request)
                )
            except Exception:
                log.exception("command sweep failed")
                db.session.rollback()
            finally:
                db.session.remove()
        if self.heartbeat_file is not None:
            self.heartbeat_file.touch()

    def _check_broker_state(self):
        """Once per connection: did the broker lose retained releases (a crash, a restore)? If so, publish them again."""
        connection = self.connection
        if connection == self.verified_connection or not self.client.is_connected():
            return
        try:
            self.marker_written = outbox.reconcile_with_marker(lambda: outbox.read_marker(self.app.config))
        except Exception as exc:
            # The outbox is still flushed; only the marker waits until the check succeeds.
            said, self.marker_check_failed_on = self.marker_check_failed_on == connection, connection
            log.log(logging.DEBUG if said else logging.ERROR,
                    "could not check the broker's release seq marker (retried at every sweep): %s", exc)
            db.session.rollback()
            return
        self.verified_connection = connection

    def _write_marker(self):
        if self.verified_connection == self.connection:
            self.marker_written = outbox.publish_marker(
                lambda messages: publish_many(self.client, messages, retain=True), self.marker_written)

    def _update_broker_roles(self):
        """Bring the broker's roles up to today's topics, devices registered under older rules included.

        Once per worker start, in the background, retried until it succeeds.
        """
        if not broker_accounts.accounts_enabled(self.app.config):
            return  # the broker's accounts are not Fleet's to manage
        delay = 1.0
        while not self.stopping.is_set():
            with self.app.app_context():
                try:
                    unit_ids = db.session.scalars(db.select(Device.unit_id)).all()
                    changed = broker_accounts.update_roles(unit_ids)
                    if changed is not None:
                        log.info("broker roles up to date: %d of %d device role(s) changed", changed, len(unit_ids))
                    return
                except Exception as exc:
                    log.error("could not bring the broker's roles up to date (retried in %.0f s): %s", delay, exc)
                finally:
                    db.session.remove()
            self.stopping.wait(delay)
            delay = min(60.0, delay * 2)

    def _adopt_orphans(self):
        for client_id, drain in list(self.drains.items()):
            if not drain.is_alive():
                del self.drains[client_id]
        for client_id in worker_sessions.claim_orphans(self.client_id, self.adopt_after):
            if client_id == self.client_id or client_id in self.drains:
                continue
            drain = SessionDrain(self.app, client_id, adopter=self.client_id)
            self.drains[client_id] = drain
            drain.start()

    def open(self):
        """Claim this worker's own session, then connect (in the background) and subscribe."""
        with self.app.app_context():
            # Claimed before connecting, so no peer drains it meanwhile.
            worker_sessions.heartbeat(self.client_id, self.worker_id)
            db.session.remove()
        connect(self.client, session_expiry=SESSION_EXPIRY)
        threading.Thread(target=self._update_broker_roles, name="broker-roles", daemon=True).start()

    def close(self):
        # The session stays on the broker: a restarted worker of the same id resumes it,
        # and if none comes back a peer drains it (worker_sessions.py).
        self.client.disconnect()
        self.client.loop_stop()

    def store_waiting(self, wait: float) -> int:
        """Store one batch of what waits (waiting at most `wait` for a first report); how many were in it."""
        batch = self._next_batch(wait)
        if batch:
            self._handle(batch)
        return len(batch)

    def run(self):
        self.open()
        next_sweep = 0.0
        try:
            while not self.stopping.is_set():
                # Reports are handled the moment they arrive; the wait only bounds how late a sweep
                # (and noticing `stop`) can be.
                self.store_waiting(min(0.2, max(0.0, next_sweep - time.monotonic())))
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + self.sweep_interval
        finally:
            self.close()
            for drain in self.drains.values():
                drain.join(10)

    def stop(self, *_):
        self.stopping.set()


class SessionDrain(threading.Thread):
    """Resume a dead worker's session, store what waits in it, and end it.

    The paho loop is driven by hand and never reconnects: if the session's owner comes
    back it takes its client id over (the broker drops this connection), and the drain
    gives the session back to it.
    """

    def __init__(self, app, client_id: str, adopter: str, quiet: float = 1.0, budget: float = 600.0):
        super().__init__(name=f"drain-{client_id}", daemon=True)
        self.app = app
        self.client_id = client_id
        self.adopter = adopter
        self.quiet = quiet
        self.budget = budget
        self.stored = 0
        self._messages: list = []
        self._events: dict = {}

    def run(self):
        drained = False
        try:
            drained = self._drain()
        except Exception:
            log.exception("draining session %s failed; it will be claimed again", self.client_id)
        with self.app.app_context():
            try:
                worker_sessions.finish_claim(self.client_id, self.adopter, drained)
            finally:
                db.session.remove()
        log.info("adopted session %s: %s, %d report(s) stored", self.client_id,
                 "drained and ended" if drained else "given back", self.stored)

    def _loop_until(self, what: str, deadline: float) -> bool:
        client = self._client
        while what not in self._events and "lost" not in self._events and time.monotonic() < deadline:
            client.loop(0.1)
            self._store_pending()
        return what in self._events

    def _store_pending(self):
        while self._messages:
            batch, self._messages = self._messages[:BATCH_LIMIT], self._messages[BATCH_LIMIT:]
            outcomes = store_reports(self.app, [(message.topic, message.payload) for message in batch])
            for message, outcome in zip(batch, outcomes):
                if outcome in (Outcome.STORED, Outcome.REJECTED):
                    self.stored += 1
                    if message.qos > 0:
                        self._client.ack(message.mid, message.qos)
            publish_confirmations(self._client, [(message.topic, message.payload) for message in batch], outcomes)
            if Outcome.UNAVAILABLE in outcomes:
                # What was not stored stays unacknowledged in the session, which goes back to be claimed again.
                raise RuntimeError("database unavailable")

    def _drain(self) -> bool:
        config = self.app.config
        client = self._client = make_client(config, self.client_id, persistent=True, manual_ack=True)
        client.on_connect = lambda c, u, flags, rc, p: self._events.setdefault(
            "connected", None if rc.is_failure else flags.session_present)
        client.on_unsubscribe = lambda *args: self._events.setdefault("unsubscribed", True)
        client.on_disconnect = lambda *args: self._events.setdefault("lost", True)
        client.on_message = lambda c, u, message: self._messages.append(message)
        host, port, _tls = mqtt_endpoint(config["FLEET_MQTT_URL"])
        deadline = time.monotonic() + self.budget
        connect_session(client, host, port, session_expiry=SESSION_EXPIRY)
        if not self._loop_until("connected", time.monotonic() + 10) or self._events["connected"] is None:
            return False
        if self._events["connected"]:
            # Stop the group routing new reports here; what is queued in the session still comes.
            group = config["FLEET_MQTT_GROUP"]
            client.unsubscribe([wire.shared_subscription(kind, group) for kind in ingest.KINDS])
            if not self._loop_until("unsubscribed", time.monotonic() + 10):
                return False
            last_activity, last_claim = time.monotonic(), 0.0
            while time.monotonic() - last_activity < self.quiet:
                if "lost" in self._events or time.monotonic() > deadline:
                    return False
                before = self.stored
                client.loop(0.1)
                self._store_pending()
                if self.stored != before:
                    last_activity = time.monotonic()
                if time.monotonic() - last_claim > 2:
                    with self.app.app_context():
                        worker_sessions.keep_claim(self.client_id, self.adopter)
                        db.session.remove()
                    last_claim = time.monotonic()
        # Ending the session (expiry 0) takes it out of the shared-subscription group.
        end_session(client)
        client.loop(0.1)
        return True


def run_worker(app, worker_id=None, heartbeat_file=None):
    worker = IngestWorker(app, worker_id, heartbeat_file=heartbeat_file)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    log.info("ingest worker %s starting, broker %s", worker.worker_id, app.config["FLEET_MQTT_URL"])
    worker.run()
