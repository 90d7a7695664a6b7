"""The remote command endpoints and the results handler, on a real SQLite database with no broker."""
import json
import time
import uuid
from datetime import timedelta

import pytest

import fleet_wire as wire
from fleet_server.commands import service
from fleet_server.commands.models import Command
from fleet_server.extensions import db
from fleet_server.messaging import ingest
from fleet_server.messaging.mqtt import request_properties
from fleet_server.models import utcnow


@pytest.fixture
def device(client, auth):
    return client.post("/dongle/devices/", json={"name": "dongle"}, headers=auth).get_json()


@pytest.fixture
def other_device(client, auth):
    return client.post("/dongle/devices/", json={"name": "other"}, headers=auth).get_json()


def _execute(client, auth, device, **body):
    return client.post(f"/dongle/devices/{device['id']}/execute/", json=body, headers=auth)


def _result(app, device, command_id, state, **fields):
    """Deliver a device's report through the ingest path, on the device's own results topic."""
    body = {"v": 1, "id": command_id, "state": state, "ts": time.time(), **fields}
    with app.app_context():
        return ingest.handle_message(wire.device_topic(device["unit_id"], "results"), json.dumps(body).encode())


def _stored(app, command_id) -> Command:
    with app.app_context():
        command = db.session.get(Command, command_id)
        db.session.expunge(command)
        return command


def test_executing_a_command_returns_201_with_its_id_and_state_queued(client, auth, device):
    response = _execute(client, auth, device, command="docker.logs", arg=["web"], kwarg={"tail": 5})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert uuid.UUID(body["id"]) and body["state"] == "queued"
    assert body["device"] == device["id"] and body["arg"] == ["web"] and body["kwarg"] == {"tail": 5}
    assert body["ttl"] == 3600 and body["timeout"] is None and body["return"] is None


def test_a_command_can_be_retrieved_and_listed_newest_first(client, auth, device):
    first = _execute(client, auth, device, command="test.ping").get_json()
    second = _execute(client, auth, device, command="grains.items").get_json()
    item = client.get(f"/dongle/devices/{device['id']}/execute/{first['id']}/", headers=auth)
    assert item.status_code == 200 and item.get_json()["command"] == "test.ping"
    listing = client.get(f"/dongle/devices/{device['id']}/execute/", headers=auth).get_json()
    assert listing["count"] == 2
    assert [c["id"] for c in listing["results"]] == [second["id"], first["id"]]


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "command"),
        ({"command": ""}, "command"),
        ({"command": 12}, "command"),
        ({"command": "docker.logs", "arg": "web"}, "arg"),
        ({"command": "docker.logs", "arg": {"name": "web"}}, "arg"),
        ({"command": "docker.logs", "kwarg": ["tail"]}, "kwarg"),
        ({"command": "docker.logs", "kwarg": "tail=5"}, "kwarg"),
        ({"command": "test.ping", "timeout": 0}, "timeout"),
        ({"command": "test.ping", "timeout": "soon"}, "timeout"),
        ({"command": "test.ping", "ttl": 0}, "ttl"),
        ({"command": "test.ping", "ttl": 10**9}, "ttl"),
        ({"command": "test.ping", "colour": "red"}, "colour"),
        ({"command": "docker.logs", "arg": ["x" * (wire.MAX_COMMAND_ARGUMENTS_BYTES + 1)]}, "arg"),
    ],
)
def test_bad_input_gets_400_naming_the_field(client, auth, device, body, field):
    response = _execute(client, auth, device, **body)
    assert response.status_code == 400, response.get_json()
    assert field in response.get_json()["errors"], response.get_json()


def test_a_command_for_an_unknown_device_gets_400_naming_the_device(client, auth):
    response = client.post(f"/dongle/devices/{uuid.uuid4()}/execute/", json={"command": "test.ping"}, headers=auth)
    assert response.status_code == 400
    assert "device_pk" in response.get_json()["errors"]


def test_commands_need_an_api_token(client, device):
    assert client.post(f"/dongle/devices/{device['id']}/execute/", json={"command": "test.ping"}).status_code == 401


def test_an_unknown_command_id_or_another_devices_command_is_404(client, auth, device, other_device):
    command = _execute(client, auth, device, command="test.ping").get_json()
    assert client.get(f"/dongle/devices/{device['id']}/execute/{uuid.uuid4()}/", headers=auth).status_code == 404
    assert client.get(f"/dongle/devices/{other_device['id']}/execute/{command['id']}/", headers=auth).status_code == 404


def test_a_result_is_stored_with_its_return_value_and_timestamps(app, client, auth, device):
    command = _execute(client, auth, device, command="test.ping").get_json()
    started = time.time()
    assert _result(app, device, command["id"], "succeeded", **{"return": True}, started_at=started,
                   finished_at=started + 0.01)
    body = client.get(f"/dongle/devices/{device['id']}/execute/{command['id']}/", headers=auth).get_json()
    assert body["state"] == "succeeded" and body["return"] is True and body["error"] is None
    assert body["started_at"] and body["finished_at"] and body["completed_at"] and body["delivered_at"]


@pytest.mark.parametrize("value", [{"containers": [{"name": "web", "ports": [80, 443]}], "ok": None}, [1, "two"],
                                   "text", 0, None])
def test_a_structured_return_value_reads_back_exactly_as_the_device_sent_it(app, client, auth, device, value):
    command = _execute(client, auth, device, command="docker.ps").get_json()
    assert _result(app, device, command["id"], "running", started_at=time.time())
    assert _result(app, device, command["id"], "succeeded", **{"return": value}, started_at=time.time(),
                   finished_at=time.time())
    body = client.get(f"/dongle/devices/{device['id']}/execute/{command['id']}/", headers=auth).get_json()
    assert body["state"] == "succeeded" and body["return"] == value
    assert body["started_at"] <= body["finished_at"] and body["delivered_at"] <= body["completed_at"]


def test_a_report_that_moves_a_command_forward_is_stored_by_one_update_without_a_read(app, client, auth, device):
    """The usual report (progress, then the final result) is one guarded UPDATE in the report's
    transaction: no read of the command, no savepoint for a report that arrives by itself."""
    from sqlalchemy import event

    command = _execute(client, auth, device, command="test.ping").get_json()
    statements = []

    def note(connection, cursor, statement, parameters, context, executemany):
        statements.append(" ".join(statement.split()[:2]).upper())

    with app.app_context():
        event.listen(db.engine, "after_cursor_execute", note)
        try:
            assert _result(app, device, command["id"], "running", started_at=time.time())
            assert _result(app, device, command["id"], "succeeded", **{"return": True}, started_at=time.time(),
                           finished_at=time.time())
        finally:
            event.remove(db.engine, "after_cursor_execute", note)
    # Per report: BEGIN IMMEDIATE on SQLite, the device by its unit_id, the command's UPDATE.
    commands_touched = [statement for statement in statements if "COMMAND" in statement or "SAVEPOINT" in statement]
    assert commands_touched == ["UPDATE COMMAND"] * 2, statements
    stored = _stored(app, command["id"])
    assert stored.state == "succeeded" and stored.return_value is True and stored.completed_at is not None


def test_a_result_stored_by_another_worker_between_the_read_and_the_write_is_not_overwritten(
    app, client, auth, device
):
    """A report that does not simply move the command forward is decided on a read of it, then
    written guarded by the state read: here a late result for a command the server marked
    `expired`. Right after this worker read the command, another one stores the device's final
    result for real, on its own connection. PostgreSQL lets it: this worker's guarded write then
    matches nothing and it decides again on what the other stored. SQLite cannot interleave them:
    a batch holds the write lock from its first statement, so the other writer is refused until
    it ends."""
    import sqlite3

    from sqlalchemy import event

    command = _execute(client, auth, device, command="test.ping").get_json()
    with app.app_context():
        service.expire_overdue(utcnow() + timedelta(hours=2))
    assert _stored(app, command["id"]).state == "expired"
    with app.app_context():
        engine = db.engine
        sqlite = engine.dialect.name == "sqlite"
        attempts = []

        def other_worker_stores_the_result(connection, cursor, statement, parameters, context, executemany):
            if attempts or not statement.lstrip().upper().startswith("SELECT") or "device_reported_at" not in statement:
                return
            final = {"state": "failed", "error": "from the other worker", "device_reported_at": time.time(),
                     "completed_at": utcnow()}
            if sqlite:
                other = sqlite3.connect(engine.url.database, timeout=0.2)
                try:
                    other.execute("UPDATE command SET state = 'failed' WHERE id = ?", (command["id"],))
                    other.commit()
                    attempts.append("stored")
                except sqlite3.OperationalError as exc:
                    attempts.append(str(exc))
                finally:
                    other.close()
            else:
                with engine.begin() as other:
                    other.execute(db.update(Command).where(Command.id == command["id"]).values(final))
                attempts.append("stored")

        event.listen(engine, "after_cursor_execute", other_worker_stores_the_result)
        try:
            assert _result(app, device, command["id"], "succeeded", **{"return": True})
        finally:
            event.remove(engine, "after_cursor_execute", other_worker_stores_the_result)
    stored = _stored(app, command["id"])
    if sqlite:
        assert attempts == ["database is locked"] and stored.state == "succeeded" and stored.return_value is True
    else:
        assert attempts == ["stored"] and stored.state == "failed" and stored.error == "from the other worker"


def test_a_result_on_another_devices_topic_cannot_complete_the_command(app, client, auth, device, other_device):
    command = _execute(client, auth, device, command="test.ping").get_json()
    assert not _result(app, other_device, command["id"], "succeeded", **{"return": "forged"})
    stored = _stored(app, command["id"])
    assert stored.state == "queued" and stored.return_value is None


def test_a_finished_command_is_not_changed_by_duplicates_or_late_progress(app, client, auth, device):
    command = _execute(client, auth, device, command="docker.logs", arg=["web"]).get_json()
    assert _result(app, device, command["id"], "failed", error="no container named 'web'")
    assert _result(app, device, command["id"], "running")
    assert _result(app, device, command["id"], "succeeded", **{"return": "other"})
    stored = _stored(app, command["id"])
    assert stored.state == "failed" and stored.error == "no container named 'web'" and stored.return_value is None


def test_progress_never_moves_a_command_back(app, client, auth, device):
    command = _execute(client, auth, device, command="state.sls", arg=["docker.release"]).get_json()
    assert _result(app, device, command["id"], "running", started_at=time.time())
    assert _result(app, device, command["id"], "delivered")
    assert _stored(app, command["id"]).state == "running"


@pytest.mark.parametrize("payload", [b"not json", b'{"v": 1, "id": "x", "state": "succeeded", "ts": 1}',
                                     b'{"v": 1, "state": "succeeded", "ts": 1}',
                                     b'{"v": 1, "id": "00000000-0000-0000-0000-000000000000", "state": "done", "ts": 1}'])
def test_malformed_results_are_rejected_without_writing_anything(app, client, auth, device, payload):
    command = _execute(client, auth, device, command="test.ping").get_json()
    with app.app_context():
        assert not ingest.handle_message(wire.device_topic(device["unit_id"], "results"), payload)
    assert _stored(app, command["id"]).state == "queued"


def test_a_queued_command_past_its_ttl_expires_and_is_never_published(app, client, auth, device):
    command = _execute(client, auth, device, command="test.ping", ttl=1).get_json()
    published = []
    with app.app_context():
        db.session.execute(db.update(Command).values(created_at=utcnow() - timedelta(seconds=5),
                                                     expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        service.publish_pending(_publishing_into(published))
    stored = _stored(app, command["id"])
    assert stored.state == "expired" and "TTL" in stored.error and published == []


def _publishing_into(published):
    """A sweep's publish that keeps (topic, payload, the MQTT v5 properties the broker link builds)."""
    return lambda topic, payload, request: published.append((topic, payload, request_properties(request))) or True


def test_the_sweep_publishes_an_unsent_command_with_mqtt_v5_properties(app, client, auth, device):
    command = _execute(client, auth, device, command="docker.logs", arg=["web"], ttl=600).get_json()
    assert _stored(app, command["id"]).published_at is None  # no broker in this test
    published = []
    with app.app_context():
        db.session.execute(db.update(Command).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
        assert service.publish_pending(_publishing_into(published)) == 1
        assert service.publish_pending(_publishing_into(published)) == 0
    (topic, payload, properties), = published
    assert topic == wire.device_topic(device["unit_id"], "commands")
    message = wire.decode(wire.CommandMessage, payload)
    assert str(message.id) == command["id"] and message.arg == ["web"]
    assert properties.ResponseTopic == wire.device_topic(device["unit_id"], "results")
    assert properties.CorrelationData == command["id"].encode()
    assert 590 <= properties.MessageExpiryInterval <= 600
    assert _stored(app, command["id"]).published_at is not None


def test_a_late_result_overturns_an_expiry_the_server_decided(app, client, auth, device):
    command = _execute(client, auth, device, command="test.ping").get_json()
    with app.app_context():
        service.expire_overdue(utcnow() + timedelta(hours=2))
    assert _stored(app, command["id"]).state == "expired"
    assert _result(app, device, command["id"], "succeeded", **{"return": True})
    assert _stored(app, command["id"]).state == "succeeded"


def _sweep(app, at):
    """Run the worker's sweep as if the clock showed `at`; returns what it published."""
    published = []
    with app.app_context():
        db.session.execute(db.update(Command).where(Command.next_attempt_at.is_not(None))
                           .values(next_attempt_at=at - timedelta(seconds=1)))
        db.session.commit()
        service.publish_pending(_publishing_into(published))
    return published


def test_an_unfinished_command_is_asked_for_again_with_a_short_lived_repeat(app, client, auth, device):
    command = _execute(client, auth, device, command="state.sls", arg=["docker.release"], ttl=3600).get_json()
    (first,) = _sweep(app, utcnow())
    assert first[2].MessageExpiryInterval > 3500  # the first copy waits out the TTL for a sleeping device
    assert _result(app, device, command["id"], "running", started_at=time.time())
    (repeat,) = _sweep(app, utcnow())
    assert wire.decode(wire.CommandMessage, repeat[1]).id == uuid.UUID(command["id"])
    assert repeat[2].MessageExpiryInterval == 20  # lives until the next repeat, no longer
    stored = _stored(app, command["id"])
    assert stored.attempts == 2 and stored.next_attempt_at > utcnow() + timedelta(seconds=15)


def test_a_finished_command_is_never_asked_for_again(app, client, auth, device):
    command = _execute(client, auth, device, command="test.ping").get_json()
    assert _result(app, device, command["id"], "succeeded", **{"return": True})
    assert _sweep(app, utcnow()) == []
    assert _stored(app, command["id"]).next_attempt_at is None


def test_the_interval_between_repeats_grows_to_a_bound():
    intervals = [service.retry_interval(n).total_seconds() for n in range(1, 12)]
    assert intervals[:4] == [10, 20, 40, 80] and intervals[-1] == 600 and intervals == sorted(intervals)
    assert service.retry_interval(10**6).total_seconds() == 600


@pytest.mark.parametrize("arg, kwarg, timeout", [
    ([], {}, None),
    (["web", 3, None, {"z": 1, "a": [True, 1.5]}], {"tail": 10, "since": "1h", "ä": "é\n\"x\""}, 2.5),
    ([1], {"b": {"d": 1, "c": 2}, "a": None}, 86400.0),
])
def test_the_command_message_the_server_writes_is_what_the_device_decodes(arg, kwarg, timeout):
    command_id, deadline = uuid.uuid4(), time.time() + 60
    message = wire.CommandMessage(id=command_id, command="docker.logs", arg=arg, kwarg=kwarg, timeout=timeout,
                                  deadline=deadline)
    assert wire.decode(wire.CommandMessage, wire.encode(message)) == message


def test_the_answer_to_a_post_reads_back_the_same_from_the_database(client, auth, device):
    created = _execute(client, auth, device, command="docker.logs", arg=["web"], kwarg={"tail": 5}, timeout=3)
    assert created.status_code == 201 and created.mimetype == "application/json"
    read = client.get(f"/dongle/devices/{device['id']}/execute/{created.get_json()['id']}/", headers=auth)
    assert created.get_json() == read.get_json()  # no broker here: nothing changed it since
