"""The ingest worker: consumes device reports through a shared subscription and sweeps the outbox.

Any number of workers can run against one database and broker; the broker hands each
report to one of them.
"""
import logging
import queue
import signal
import socket
import threading
import time

from fleet_device import wire

from . import ingest, outbox
from .commands import service as commands
from .extensions import db
from .mqtt import connect, make_client, publish_and_wait

log = logging.getLogger(__name__)

SESSION_EXPIRY = 24 * 3600  # reports wait on the broker this long while every worker is down


class IngestWorker:
    def __init__(self, app, worker_id: str | None = None, sweep_interval: float = 1.0):
        self.app = app
        self.worker_id = worker_id or socket.gethostname()
        self.sweep_interval = sweep_interval
        self.inbox: queue.Queue = queue.Queue(maxsize=10000)
        self.stopping = threading.Event()
        self.received = self.rejected = 0
        # A stable client id per worker keeps its session (and the reports queued in it)
        # across restarts.
        self.client = make_client(app.config, f"fleet-worker-{self.worker_id}", persistent=True, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the worker: %s", reason_code)
            return
        group = self.app.config["FLEET_MQTT_GROUP"]
        client.subscribe([(wire.shared_subscription(kind, group), 1) for kind in ingest.KINDS])
        log.info("worker %s connected and subscribed", self.worker_id)

    def _on_message(self, client, userdata, message):
        # Tiny on purpose: the network loop must never block or die here.
        try:
            self.inbox.put((message.topic, message.payload, message.mid, message.qos), timeout=5)
        except queue.Full:
            log.error("worker inbox full; message will be redelivered topic=%s", message.topic)

    def _handle(self, topic, payload, mid, qos):
        with self.app.app_context():
            try:
                accepted = ingest.handle_message(topic, payload)
            except Exception:
                # A database outage: do not acknowledge, the broker redelivers after reconnect.
                log.exception("could not store message topic=%s", topic)
                db.session.rollback()
                return
            finally:
                db.session.remove()
        self.received += 1
        self.rejected += not accepted
        if qos > 0:
            self.client.ack(mid, qos)

    def _sweep(self):
        with self.app.app_context():
            try:
                outbox.flush(lambda topic, payload: publish_and_wait(self.client, topic, payload, retain=True))
            except Exception:
                log.exception("outbox sweep failed")
                db.session.rollback()
            try:
                commands.publish_pending(
                    lambda topic, payload, properties: publish_and_wait(self.client, topic, payload,
                                                                        properties=properties)
                )
            except Exception:
                log.exception("command sweep failed")
                db.session.rollback()
            finally:
                db.session.remove()

    def run(self):
        connect(self.client, session_expiry=SESSION_EXPIRY)
        next_sweep = 0.0
        try:
            while not self.stopping.is_set():
                # A report is handled the moment it arrives; the wait only bounds how late a sweep
                # (and noticing `stop`) can be.
                try:
                    self._handle(*self.inbox.get(timeout=min(0.2, max(0.0, next_sweep - time.monotonic()))))
                except queue.Empty:
                    pass
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + self.sweep_interval
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def stop(self, *_):
        self.stopping.set()


def run_worker(app, worker_id=None):
    worker = IngestWorker(app, worker_id)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    log.info("ingest worker %s starting, broker %s", worker.worker_id, app.config["FLEET_MQTT_URL"])
    worker.run()
