"""Reports the worker cannot store are acknowledged and kept as dead letters; only a database outage holds them back."""
import base64
import json
import logging
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import fleet_wire as wire
from fleet_server import broker_accounts, models
from fleet_server.deadletters import service as dead_letters
from fleet_server.extensions import db
from fleet_server.messaging.worker import Outcome, store_reports
from tests.support.infra import free_port
from tests.support.stack import eventually, make_app, release_payload, running_stack


@pytest.fixture
def device(app):
    with app.app_context():
        made = models.Device(name="reporter")
        db.session.add(made)
        db.session.commit()
        return {"id": made.id, "unit_id": made.unit_id}


def _status(agent_version) -> bytes:
    return json.dumps({"v": 1, "state": "online", "agent_version": agent_version, "ts": time.time()}).encode()


def _letters(app):
    with app.app_context():
        try:
            return db.session.scalars(db.select(models.DeadLetter).order_by(models.DeadLetter.id)).all()
        finally:
            db.session.remove()


def _agent_version(app, device):
    with app.app_context():
        try:
            return db.session.get(models.Device, device["id"]).agent_version
        finally:
            db.session.remove()


def test_a_report_with_unstorable_text_is_acknowledged_and_kept_as_a_dead_letter(app, device):
    topic, poison = wire.device_topic(device["unit_id"], "status"), _status("\ud800")
    outcomes = store_reports(app, [(topic, poison), (topic, _status("1.2.3"))])

    assert outcomes == [Outcome.REJECTED, Outcome.STORED]
    assert _agent_version(app, device) == "1.2.3"  # its neighbour in the batch is stored
    [letter] = _letters(app)
    assert (letter.topic, letter.unit_id, letter.kind) == (topic, device["unit_id"], "status")
    assert "agent_version: text holding a lone surrogate" in letter.reason
    assert (bytes(letter.payload), letter.payload_size) == (poison, len(poison))


def test_a_report_the_database_refuses_is_a_dead_letter_and_its_batch_is_stored(app, device):
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        pytest.skip("SQLite stores text longer than its column")
    topic = wire.device_topic(device["unit_id"], "status")
    too_long = "v" * 60  # the column holds 50: PostgreSQL raises DataError, which no retry cures
    outcomes = store_reports(app, [(topic, _status("1.0")), (topic, _status(too_long)), (topic, _status("2.0"))])

    assert outcomes == [Outcome.STORED, Outcome.REJECTED, Outcome.STORED]
    assert _agent_version(app, device) == "2.0"
    [letter] = _letters(app)
    assert letter.reason.startswith("storing it failed: DataError") and "value too long" in letter.reason


def test_malformed_and_misaddressed_reports_are_dead_letters_too(app, device):
    unknown = "0f0f0f0f-0000-4000-8000-000000000000"
    messages = [(wire.device_topic(device["unit_id"], "deployments"), b"\xff\xfe not json"),
                (wire.device_topic(unknown, "status"), _status("1.0")),
                ("fleet/v1/devices/not-a-unit/status", b"{}")]
    assert store_reports(app, messages) == [Outcome.REJECTED] * 3
    letters = _letters(app)
    assert [(letter.unit_id, letter.kind) for letter in letters] == [
        (device["unit_id"], "deployments"), (unknown, "status"), (None, None)]
    assert "not UTF-8: byte 0xff at position 0" in letters[0].reason
    assert letters[1].reason == f"no device has unit_id {unknown}"
    assert "is not a device topic" in letters[2].reason


def test_a_database_outage_leaves_reports_unacknowledged_even_the_unstorable_ones(tmp_path):
    nowhere = make_app(f"postgresql+psycopg://fleet:pw@127.0.0.1:{free_port()}/fleet", tmp_path)
    topic = wire.device_topic("0f0f0f0f-0000-4000-8000-000000000000", "status")
    # The unstorable one waits too: it is kept as a dead letter once the database is back.
    assert store_reports(nowhere, [(topic, _status("1.0")), (topic, _status("\ud800"))]) == [Outcome.UNAVAILABLE] * 2


def test_only_the_newest_dead_letters_are_kept(app, device):
    app.config["FLEET_DEAD_LETTERS_KEPT"] = 3
    topic = wire.device_topic(device["unit_id"], "status")
    for batch in range(3):
        store_reports(app, [(topic, f'{{"v": 1, "bad": {batch}{index}'.encode()) for index in range(2)])
    assert [bytes(letter.payload) for letter in _letters(app)] == [b'{"v": 1, "bad": 11', b'{"v": 1, "bad": 20',
                                                                   b'{"v": 1, "bad": 21']


def test_admins_read_dead_letters_with_their_exact_payload_and_no_one_else_does(app, client, device):
    topic = wire.device_topic(device["unit_id"], "telemetry")
    large = b'{"v": 1, "junk": "' + b"\xff" * (dead_letters.PAYLOAD_KEPT + 100) + b'"}'
    not_utf8 = b'{"v": 1, "x": "\xc3"}'
    store_reports(app, [(topic, not_utf8), (topic, large)])
    from fleet_server.tokens import service as tokens

    with app.app_context():
        admin, operator, viewer = (tokens.create(role, None, role)[1] for role in ("admin", "operator", "viewer"))
    for token in (operator, viewer):
        for path in ("/ingest/dead-letters/", "/ingest/dead-letters/1/"):
            refused = client.get(path, headers={"Authorization": f"APIToken {token}"})
            assert refused.status_code == 403 and "reading dead letters needs admin" in refused.get_json()["message"]
    assert client.get("/ingest/dead-letters/").status_code == 401

    headers = {"Authorization": f"APIToken {admin}"}
    page = client.get(f"/ingest/dead-letters/?unit_id={device['unit_id']}&kind=telemetry&limit=1", headers=headers)
    assert page.status_code == 200
    listed = page.get_json()
    assert listed["count"] == 2 and listed["next"] is not None and "payload" not in listed["results"][0]
    newest, oldest = listed["results"][0], client.get(listed["next"], headers=headers).get_json()["results"][0]
    assert newest["payload_size"] == len(large) and oldest["payload_size"] == len(not_utf8)

    small = client.get(f"/ingest/dead-letters/{oldest['id']}/", headers=headers).get_json()
    assert small["payload"] == '{"v": 1, "x": "\\xc3"}' and not small["payload_truncated"]
    assert base64.b64decode(small["payload_base64"]) == not_utf8
    big = client.get(f"/ingest/dead-letters/{newest['id']}/", headers=headers).get_json()
    assert big["payload_truncated"] and len(base64.b64decode(big["payload_base64"])) == dead_letters.PAYLOAD_KEPT
    assert client.get("/ingest/dead-letters/99999/", headers=headers).status_code == 404
    assert client.get("/ingest/dead-letters/?unit_id=someone-else", headers=headers).get_json()["count"] == 0


def test_dead_letters_are_logged_one_by_one_up_to_a_budget_then_counted(caplog):
    now = [0.0]
    limited = dead_letters.RateLimitedLog(lines=3, window=60.0, clock=lambda: now[0])
    letter = dead_letters.Letter("fleet/v1/devices/x/status", b"", "payload refused: agent_version: \ud800")
    with caplog.at_level(logging.WARNING, logger=dead_letters.__name__):
        for _ in range(10):
            limited.line(letter)
        assert caplog.text.count("kept as a dead letter topic=fleet/v1/devices/x/status") == 3
        assert "\\ud800" in caplog.text  # escaped: a log line must be writable too
        now[0] = 61.0
        limited.line(letter)
    assert "dead letters: 7 more in the last 61 s not logged one by one" in caplog.text
    assert caplog.text.count("kept as a dead letter") == 4  # a new window, a new budget


# --- end to end: one device floods poison, the rest of the fleet is not held up ---

FLOOD = 2000


@pytest.fixture
def secured_stack(secured_broker, docker_client, tmp_path):
    """Server and worker on the secured broker, devices on accounts of their own."""
    with running_stack(secured_broker.url, docker_client, tmp_path, extra_env=secured_broker.server_env(),
                       web_workers=1) as running:
        yield running


def _register(stack, name):
    token = stack.post("/dongle/provisioning-tokens/", json={"name": name}).json()["token"]
    registered = stack.post("/dongle/register/", json={"token": token, "hardware_id": f"hw-{uuid.uuid4().hex}"})
    assert registered.status_code == 201, registered.text
    return registered.json()


class DeviceClient:
    """A device on the real broker with its own account: publishes reports, answers test.ping."""

    def __init__(self, broker, registration, answer_commands=False):
        self.unit_id = registration["unit_id"]
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=broker_accounts.device_client_id(self.unit_id),
                                  protocol=paho.MQTTv5)
        self.client.username_pw_set(registration["broker"]["username"], registration["broker"]["password"])
        self.client.max_inflight_messages_set(100)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.answer_commands = answer_commands
        self.client.on_message = self._on_command
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(10), "the device's account was refused"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            if self.answer_commands:
                client.subscribe(wire.device_topic(self.unit_id, "commands"), qos=1)
            self.connected.set()

    def _on_command(self, client, userdata, message):
        command = wire.decode(wire.CommandMessage, message.payload)
        self.report("results", wire.encode(wire.from_builtins(wire.CommandResult, {
            "id": str(command.id), "state": "succeeded", "return": True, "error": None, "truncated": False,
            "started_at": time.time(), "finished_at": time.time(), "ts": time.time()})))

    def report(self, kind, payload: bytes):
        return self.client.publish(wire.device_topic(self.unit_id, kind), payload, qos=1)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def _poison(index: int, release: dict, command_id: str) -> tuple[str, bytes]:
    """A report that only its text makes unstorable, about things that exist, in each kind where a device writes
    free text: before text was checked at decode, each of them failed in the database."""
    kind = ("status", "deployments", "results")[index % 3]
    body = {
        "status": {"state": "online", "agent_version": "\ud800"},
        "deployments": {"project_id": release["project_id"], "release_id": release["id"], "state": "failed",
                        "step": "pull\udc00", "detail": f"poison {index}", "ts": time.time()},
        "results": {"id": command_id, "state": "failed", "error": "\udbff", "ts": time.time()},
    }[kind]
    return kind, json.dumps({"v": 1, **body}).encode()


def _dead_letter_count(stack, unit_id):
    return stack.get("/ingest/dead-letters/", params={"unit_id": unit_id, "limit": 1}).json()["count"]


@pytest.mark.slow
def test_a_device_flooding_unstorable_reports_holds_up_no_other_device_even_across_a_worker_restart(
        secured_stack, secured_broker):
    stack = secured_stack
    flooder, bystander = _register(stack, "flooder"), _register(stack, "bystander")
    project = stack.post("/docker/projects/", json={"name": "fleet"}).json()
    release = stack.post(f"/docker/projects/{project['id']}/releases/",
                         json=release_payload([bystander["id"], flooder["id"]], "app", "v1")).json()
    release["project_id"] = project["id"]
    flooders_command = stack.post(f"/dongle/devices/{flooder['id']}/execute/", json={"command": "test.ping"}).json()
    eventually(lambda: "connected and subscribed" in stack.worker.log(), 30, message="the worker to subscribe")
    poisoner = DeviceClient(secured_broker, flooder)
    device = DeviceClient(secured_broker, bystander, answer_commands=True)
    try:
        sent = [poisoner.report(*_poison(index, release, flooders_command["id"])) for index in range(FLOOD)]
        for info in sent:
            info.wait_for_publish(60)
        assert all(info.is_published() for info in sent), "the broker did not take the whole flood"

        # The other device's status, deployment report and a command round trip all get through.
        device.report("status", wire.encode(wire.from_builtins(wire.Status, {"state": "online", "agent_version": "b-1.0",
                                                                  "ts": time.time()})))
        device.report("deployments", wire.encode(wire.from_builtins(wire.DeploymentReport, {
            "project_id": project["id"], "release_id": release["id"], "version_hash": release["version_hash"],
            "state": "succeeded", "step": None, "detail": "", "ts": time.time()})))
        command = stack.post(f"/dongle/devices/{bystander['id']}/execute/", json={"command": "test.ping"}).json()
        answered = lambda: stack.get(f"/dongle/devices/{bystander['id']}/execute/{command['id']}/").json()  # noqa: E731
        eventually(lambda: answered()["state"] == "succeeded", 90, 0.5,
                   message="the command to be answered and stored\n" + stack.logs())
        record = stack.get(f"/dongle/devices/{bystander['id']}/").json()
        assert (record["online"], record["agent_version"], record["docker_releases"]) == (True, "b-1.0",
                                                                                        [release["id"]])

        # Every poison report is acknowledged and kept, each naming the field at fault.
        eventually(lambda: _dead_letter_count(stack, flooder["unit_id"]) == FLOOD, 90, 0.5,
                   message=f"{FLOOD} dead letters\n" + stack.logs())
        newest = stack.get("/ingest/dead-letters/", params={"unit_id": flooder["unit_id"], "limit": 3}).json()
        reasons = {letter["kind"]: letter["reason"] for letter in newest["results"]}
        assert "agent_version: text holding a lone surrogate" in reasons["status"]
        assert "step: text holding a lone surrogate" in reasons["deployments"]
        assert "error: text holding a lone surrogate" in reasons["results"]
        assert stack.worker.log().count("kept as a dead letter") <= dead_letters.LOG_LINES_PER_WINDOW + 5

        # A restarted worker resumes its session: nothing of the flood is delivered again.
        worker_id = stack.worker.args[-1]
        stack.worker.stop()
        earlier = len(stack.worker.log())  # the restarted worker appends to the same log file
        restarted = stack.start_worker(worker_id)
        eventually(lambda: "connected and subscribed" in restarted.log()[earlier:], 30, message="the restarted worker")
        device.report("status", wire.encode(wire.from_builtins(wire.Status, {"state": "online", "agent_version": "b-2.0",
                                                                  "ts": time.time()})))
        eventually(lambda: stack.get(f"/dongle/devices/{bystander['id']}/").json()["agent_version"] == "b-2.0", 30,
                   message="a report after the restart\n" + restarted.log()[-3000:])
        time.sleep(1.0)  # what a session would redeliver comes first, at once
        assert _dead_letter_count(stack, flooder["unit_id"]) == FLOOD
        assert "dead letter" not in restarted.log()[earlier:]
    finally:
        poisoner.close()
        device.close()
