"""The ingest worker stores what waits in its inbox as one batch: one transaction, acknowledged after the commit.

Real broker, real database (SQLite and PostgreSQL). The worker runs in this process and is
stepped by hand (`store_waiting`) so that a batch is exactly what the broker delivered;
whether it acknowledged a report is read off the broker: a worker resuming the same
session gets again whatever was not acknowledged.
"""
import sqlite3
import threading
import time
import uuid

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

import fleet_wire as wire
from fleet_server.messaging.worker import IngestWorker
from tests.support.infra import close_mqtt, connect_mqtt
from tests.support.stack import add_release_for_new_devices, eventually

DEVICES = 12


@pytest.fixture
def broker(restartable_broker):
    """A broker of this test's own: on the session's broker a group also gets every other test's reports."""
    return restartable_broker


@pytest.fixture
def fleet(database_url, broker, tmp_path):
    """An app on a fresh database with DEVICES devices and a release that targets them all."""
    from fleet_server.app import create_app
    from fleet_server.extensions import db

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "FLEET_MQTT_URL": broker.url,
                      "FLEET_VAR_DIR": str(tmp_path / "var")})
    with app.app_context():
        fleet = {"app": app, **add_release_for_new_devices(DEVICES)}
    yield fleet
    with app.app_context():
        db.engine.dispose()


def _report(fleet, index: int, release_id=None) -> tuple[str, bytes]:
    body = {"project_id": fleet["project"], "release_id": release_id or fleet["release"], "version_hash": "0badc0de",
            "state": "queued", "step": None, "detail": "", "ts": time.time()}
    return wire.device_topic(fleet["units"][index], "deployments"), wire.encode(wire.from_builtins(wire.DeploymentReport, body))


def _publish(broker, messages):
    client, _ = connect_mqtt(broker.host, broker.port, client_id=f"fleet-test-devices-{uuid.uuid4().hex[:6]}")
    try:
        for info in [client.publish(topic, payload, qos=1) for topic, payload in messages]:
            info.wait_for_publish(10)
    finally:
        close_mqtt(client)


def _worker(fleet, worker_id: str) -> IngestWorker:
    worker = IngestWorker(fleet["app"], worker_id)
    subscribed = threading.Event()
    on_subscribe = worker.client.on_subscribe
    worker.client.on_subscribe = lambda *args: subscribed.set()
    worker.open()
    assert subscribed.wait(15), "the worker never subscribed"
    worker.client.on_subscribe = on_subscribe
    return worker


def _stored(fleet) -> list[tuple[str, str]]:
    from fleet_server import models
    from fleet_server.extensions import db

    with fleet["app"].app_context():
        try:
            return sorted(db.session.execute(db.select(models.Deployment.device_id, models.Deployment.state)).all())
        finally:
            db.session.remove()


def _redelivered(fleet, worker_id: str, settle: float = 1.5) -> int:
    """How many reports the broker hands a worker resuming this session (the unacknowledged ones)."""
    worker = _worker(fleet, worker_id)
    try:
        time.sleep(settle)
        return worker.inbox.qsize()
    finally:
        worker.close()


def _inbox_holds(worker, count):
    eventually(lambda: worker.inbox.qsize() >= count, 20, 0.05, message=f"{count} reports in the inbox")


def test_a_bad_report_in_the_middle_of_a_batch_is_rejected_alone_and_the_rest_is_stored(fleet, broker):
    worker_id = f"batch-{uuid.uuid4().hex[:6]}"
    worker = _worker(fleet, worker_id)
    messages = [_report(fleet, i) for i in range(5)]
    messages.append((wire.device_topic(fleet["units"][5], "deployments"), b'{"not": "a report"'))  # malformed
    messages.append(_report(fleet, 6, release_id=999999))  # well-formed, but names a release that does not exist
    messages += [_report(fleet, i) for i in range(7, DEVICES)]
    try:
        _publish(broker, messages)
        _inbox_holds(worker, len(messages))
        assert worker.store_waiting(0) == len(messages)  # one batch, one transaction
        assert worker.received == len(messages) and worker.rejected == 2
    finally:
        worker.close()
    stored = _stored(fleet)
    expected = {fleet["ids"][i] for i in range(DEVICES) if i not in (5, 6)}
    assert {device for device, _state in stored} == expected
    assert len(stored) == len(expected)
    assert _redelivered(fleet, worker_id) == 0  # every one acknowledged, the rejected ones too


def _hold_sqlite_lock(fleet, app, url):
    """Another process's writer holds the database past the worker's busy timeout."""
    from fleet_server.extensions import db

    with app.app_context():
        db.engine.dispose()
        event.listen(db.engine, "connect", lambda connection, record: connection.execute("PRAGMA busy_timeout=300"))
    holder = sqlite3.connect(make_url(url).database, isolation_level=None, timeout=5)
    holder.execute("BEGIN EXCLUSIVE")
    return lambda: None, holder.close  # closing the connection ends its transaction and frees the lock


def _drop_postgres_mid_batch(fleet, app, url):
    """The server drops the worker's connection while the batch waits on a row in its middle,
    and refuses new connections until `restore`."""
    from sqlalchemy import create_engine

    database = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    locker = create_engine(url).connect()
    locker.execute(text("SELECT 1 FROM device WHERE unit_id = :unit FOR UPDATE"), {"unit": fleet["units"][6]})

    def cut():
        with admin.connect() as connection:
            eventually(lambda: connection.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"),
                {"db": database}).scalar() >= 1, 20, 0.05, message="the batch to wait on the locked row")
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database})

    def restore():
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        locker.invalidate()  # the server ended it along with the worker's
        admin.dispose()

    return cut, restore


def test_a_batch_the_database_fails_mid_way_is_not_acknowledged_and_is_stored_once_when_it_is_back(
        fleet, broker, database_url):
    app = fleet["app"]
    worker_id = f"batch-{uuid.uuid4().hex[:6]}"
    # Status reports: each updates its device's row, so the PostgreSQL batch waits on device 6's lock
    # after it has written devices 0-5 in its transaction.
    messages = [(wire.device_topic(unit, "status"),
                 wire.encode(wire.from_builtins(wire.Status, {"state": "online", "agent_version": "9.9", "ts": time.time()})))
                for unit in fleet["units"]]
    messages += [_report(fleet, i) for i in range(6)]  # 18 in all: the test broker keeps 20 in flight per client
    worker = _worker(fleet, worker_id)
    restore = None
    try:
        _publish(broker, messages)
        _inbox_holds(worker, len(messages))
        if database_url.startswith("sqlite"):
            cut, restore = _hold_sqlite_lock(fleet, app, database_url)
        else:
            cut, restore = _drop_postgres_mid_batch(fleet, app, database_url)
        cutter = threading.Thread(target=cut)
        cutter.start()
        assert worker.store_waiting(0) == len(messages)
        cutter.join(30)
        assert worker.received == 0 and len(worker.retry) == len(messages)  # none acknowledged, all kept to retry
    finally:
        worker.close()
        if restore:
            restore()
    assert _stored(fleet) == []  # nothing of the failed batch was committed

    # The worker died with them unacknowledged: the broker hands all of them to the next one.
    resumed = _worker(fleet, worker_id)
    try:
        _inbox_holds(resumed, len(messages))
        while resumed.store_waiting(0.5):
            pass
        assert resumed.received == len(messages) and resumed.rejected == 0
    finally:
        resumed.close()
    stored = _stored(fleet)
    assert sorted(device for device, _state in stored) == sorted(fleet["ids"][:6])  # each once
    assert _redelivered(fleet, worker_id) == 0
    with app.app_context():
        from fleet_server import models
        from fleet_server.extensions import db

        assert db.session.scalar(db.select(db.func.count()).select_from(models.Device)
                                 .where(models.Device.online.is_(True))) == DEVICES
        db.session.remove()
