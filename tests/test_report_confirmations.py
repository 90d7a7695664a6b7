"""A report counts as delivered once the server stored it: the agent keeps and resends it until the
server's confirmation names it, and the server stores a report sent twice once.

The pure parts (the agent's pending reports, the worker's confirmations) are tested on their own;
then over the secured broker (who may read a confirmation), with a real agent process whose reports
a restarted broker dropped, and with 200 simulated devices (the agent's own code) reporting
deployments while the broker is killed with SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from benchmarks.fleet_sim import Fleet
import fleet_wire as wire
from fleet_device.pending_reports import PendingReports
from fleet_device.telemetry import Telemetry, TelemetryConfig
from fleet_server import broker_accounts
from fleet_server.messaging.worker import Outcome, confirmations
from tests.support.infra import build_busybox_variant, wait_for_mqtt
from tests.support.stack import eventually, release_payload, running_stack
from tests.test_broker_security import Connection


# --- the agent's pending reports -------------------------------------------------------------

class Published(list):
    """Stands in for the MQTT client: records (kind, decoded payload, retain)."""

    def __call__(self, kind, payload, retain):
        self.append((kind, json.loads(payload), retain))

    def rids(self, kind="deployments"):
        return [body["rid"] for sent_kind, body, _ in self if sent_kind == kind]


def deployment(state="started", ts=1.0):
    return {"project_id": 1, "release_id": 2, "version_hash": "0badc0de", "state": state, "step": None,
            "detail": "", "ts": ts}


def test_a_report_is_kept_on_disk_until_confirmed_even_across_a_restart(tmp_path):
    published = Published()
    reports = PendingReports(tmp_path / "reports", published)
    reports.send("deployments", deployment("started"))
    reports.send("deployments", deployment("succeeded", 2.0))
    first, second = published.rids()
    assert wire.decode(wire.DeploymentReport, json.dumps({"v": 1, **published[0][1]}).encode()).rid == first

    restarted = PendingReports(tmp_path / "reports", published)
    assert [r.rid for r in restarted.pending()] == [first, second]  # oldest first
    assert restarted.confirm([first, "unknown"]) == 1
    assert [r.rid for r in PendingReports(tmp_path / "reports", published).pending()] == [second]


def test_an_unconfirmed_report_is_sent_again_after_the_interval_and_every_one_after_a_reconnect(tmp_path):
    published = Published()
    reports = PendingReports(tmp_path / "reports", published, resend_interval=0.2)
    reports.send("deployments", deployment())
    (rid,) = published.rids()
    assert reports.resend() == 0  # not due yet
    reconnected_at = time.monotonic()
    reports.send("deployments", deployment("pulling", 2.0))  # sent on the new connection
    assert reports.resend(reconnected_at) == 1  # only what went before the reconnect
    time.sleep(0.25)
    assert reports.resend() == 2 and published.rids().count(rid) == 3  # the same id each time
    reports.confirm(published.rids())
    time.sleep(0.25)
    assert reports.resend(time.monotonic()) == 0


def test_a_newer_status_replaces_the_unconfirmed_older_one_and_is_not_written_to_disk(tmp_path):
    published = Published()
    reports = PendingReports(tmp_path / "reports", published)
    reports.send("status", {"state": "online", "agent_version": "1", "ts": 1.0}, slot="status", durable=False)
    reports.send("status", {"state": "offline", "agent_version": "1", "ts": 2.0}, slot="status", durable=False)
    assert [r.body["state"] for r in reports.pending()] == ["offline"]
    assert all(retain for _kind, _body, retain in published)  # a status stays retained
    assert not list((tmp_path / "reports").glob("*.json"))


def test_past_the_limit_the_oldest_report_is_dropped_and_counted(tmp_path):
    published = Published()
    reports = PendingReports(tmp_path / "reports", published, limit=3)
    for ts in range(5):
        reports.send("deployments", deployment(ts=float(ts)))
    assert [r.body["ts"] for r in reports.pending()] == [2.0, 3.0, 4.0]
    assert reports.dropped == 2 and len(list((tmp_path / "reports").glob("*.json"))) == 3


def test_a_report_that_does_not_fit_its_schema_is_refused_before_it_is_kept(tmp_path):
    reports = PendingReports(tmp_path / "reports", Published())
    with pytest.raises(wire.WireError, match="state"):
        reports.send("deployments", deployment(state="not a state"))
    assert not reports.pending()


class AcknowledgingClient:
    """Stands in for paho: the broker takes every publication at once; records the payloads."""

    def __init__(self):
        self.payloads = []

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        self.payloads.append(json.loads(payload))
        return SimpleNamespace(wait_for_publish=lambda timeout=None: None, is_published=lambda: True)

    def batch_ids(self):
        return [payload["batch_id"] for payload in self.payloads]


def test_a_telemetry_batch_the_broker_took_is_sent_again_until_the_server_confirms_it(tmp_path):
    client, connected = AcknowledgingClient(), threading.Event()
    connected.set()
    telemetry = Telemetry(str(uuid.uuid4()), tmp_path, client, connected,
                          TelemetryConfig(sources=(), batch_size=2, confirm_timeout=0.3))
    telemetry.add([{"field": "v", "type": "double", "ts": 1.0 + n, "value": float(n)} for n in range(4)])
    telemetry.start()
    try:
        eventually(lambda: len(client.batch_ids()) >= 3, 10, 0.05, "the first batch sent three times")
        first = client.batch_ids()[0]
        assert set(client.batch_ids()) == {first}  # the same batch, never the next one unconfirmed
        assert telemetry.confirm(["not-a-batch", first]) == 1
        second = eventually(lambda: [b for b in client.batch_ids() if b != first], 10, 0.05, "the next batch")[0]
        telemetry.reconnected()  # after a reconnect the unconfirmed batch goes again at once
        eventually(lambda: client.batch_ids().count(second) >= 2, 2, 0.02, "the batch resent on reconnect")
        telemetry.confirm([second])
        eventually(lambda: telemetry.stats()["in_flight"] == 0 and telemetry.stats()["waiting"] == 0, 10, 0.05,
                   "nothing left to send")
        assert telemetry.stats()["sent_batches"] == 2
    finally:
        telemetry.stop()


# --- the worker's confirmations -----------------------------------------------------------------

def test_the_worker_confirms_each_devices_settled_reports_by_their_ids():
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    batch_id, command_id = uuid.uuid4().hex, str(uuid.uuid4())
    messages = [
        (wire.device_topic(a, "deployments"), json.dumps({"rid": "r1", "state": "started"}).encode()),
        (wire.device_topic(a, "telemetry"), json.dumps({"batch_id": batch_id}).encode()),
        (wire.device_topic(b, "results"), json.dumps({"id": command_id, "state": "succeeded"}).encode()),
        (wire.device_topic(b, "results"), json.dumps({"id": "progress", "state": "running"}).encode()),
        (wire.device_topic(b, "status"), json.dumps({"state": "online"}).encode()),  # an older agent: no rid
        (wire.device_topic(b, "deployments"), b"not json"),
        (wire.device_topic(a, "deployments"), json.dumps({"rid": "refused"}).encode()),
        (wire.device_topic(a, "deployments"), json.dumps({"rid": "db-down"}).encode()),
        (wire.device_topic(a, "deployments"), json.dumps({"rid": "kept-as-dead-letter"}).encode()),
        ("not/a/device/topic", json.dumps({"rid": "x"}).encode()),
    ]
    outcomes = [Outcome.STORED] * 6 + [Outcome.REJECTED, Outcome.UNAVAILABLE, Outcome.REJECTED, Outcome.REJECTED]
    assert confirmations(messages, outcomes) == {a: ["r1", batch_id, "refused", "kept-as-dead-letter"], b: [command_id]}


def test_a_confirmation_payload_follows_the_contract():
    payload = wire.encode(wire.Confirmation(ids=["r1", "r2"]))
    assert wire.decode(wire.Confirmation, payload).ids == ["r1", "r2"]
    assert wire.decode(wire.Confirmation, b'{"v": 1, "later": true}').ids == []  # fields it does not know pass
    with pytest.raises(wire.WireError, match="ids"):
        wire.decode(wire.Confirmation, b'{"v": 1, "ids": [5]}')


# --- who may read a confirmation ------------------------------------------------------------------

def test_a_device_reads_its_own_confirmations_and_not_another_devices(secured_broker):
    control = secured_broker.control()
    units = [str(uuid.uuid4()), str(uuid.uuid4())]
    connections = []
    try:
        credentials = {}
        for unit_id in units:
            broker_accounts._ensure_role(control, broker_accounts.device_role(unit_id),
                                         broker_accounts.device_role_acls(unit_id))
            password = uuid.uuid4().hex
            broker_accounts._create_or_update_client(control, unit_id, password, broker_accounts.device_role(unit_id),
                                                     broker_accounts.device_client_id(unit_id))
            credentials[unit_id] = password
        own, other = units
        device = Connection(secured_broker, own, credentials[own], client_id=broker_accounts.device_client_id(own))
        connections.append(device)
        assert device.accepted
        assert device.subscribe(wire.device_topic(own, "confirmations"))
        assert not device.subscribe(wire.device_topic(other, "confirmations"))
        assert not device.publish(wire.device_topic(own, "confirmations"), wire.encode(wire.Confirmation(ids=["forged"])))

        server = Connection(secured_broker, *secured_broker.server)
        connections.append(server)
        assert server.publish(wire.device_topic(own, "confirmations"), wire.encode(wire.Confirmation(ids=["r1"])))
        message = eventually(lambda: device.messages, 10, 0.05, "the confirmation at the device")[0]
        assert wire.decode(wire.Confirmation, message.payload).ids == ["r1"]
    finally:
        for connection in connections:
            connection.close()
        for unit_id in units:
            control.run({"command": "deleteClient", "username": unit_id}, ignore=("not found",))
            control.run({"command": "deleteRole", "rolename": broker_accounts.device_role(unit_id)},
                        ignore=("not found",))
        control.close()


# --- a real agent whose reports a restarted broker dropped -----------------------------------------

def _database(stack) -> str:
    return stack.env["FLEET_DATABASE_URL"].removeprefix("sqlite:///")


def _deployment_states(stack, release_id: int) -> dict[str, str]:
    with sqlite3.connect(_database(stack), timeout=30) as connection:
        return dict(connection.execute(
            "SELECT device.unit_id, deployment.state FROM deployment JOIN device ON device.id = deployment.device_id"
            " WHERE deployment.release_id = ?", (release_id,)).fetchall())


def _kill_broker(broker):
    """SIGKILL: the broker writes nothing of its state, so every session and subscription is gone."""
    broker.container.kill()
    broker.container.reload()


@pytest.mark.slow
def test_a_deployment_report_the_broker_dropped_reaches_the_server_once_the_worker_is_back(
        restartable_broker, docker_client, unique_name, tmp_path):
    reference = unique_name.image("workload", tag="v1")
    build_busybox_variant(docker_client, reference, cmd=["sleep", "3600"])
    image, tag = reference.rsplit(":", 1)
    with running_stack(restartable_broker.url, docker_client, tmp_path, worker_id="confirm-agent",
                       web_workers=1) as stack:
        device = stack.create_device()
        agent = stack.start_agent(device, extra_args=["--report-resend-interval", "1"])
        project = stack.post("/docker/projects/", json={"name": f"confirm-{uuid.uuid4().hex[:6]}"}).json()
        body = release_payload([device["id"]], image, tag, name=f"app{uuid.uuid4().hex[:8]}")
        release = stack.post(f"/docker/projects/{project['id']}/releases/", json=body).json()
        eventually(lambda: _deployment_states(stack, release["id"]).get(device["unit_id"]) == "queued", 30,
                   message="the queued report stored")

        # The broker dies and comes back before the worker does: the agent reconnects and reports to
        # a broker with no worker subscribed, which acknowledges each report and drops it.
        _kill_broker(restartable_broker)
        stack.worker.kill()
        restartable_broker.start()
        eventually(lambda: agent.process.log().count("connected unit_id=") >= 2, 60, message="the agent back")
        slept = agent.sleep()
        assert slept.returncode == 0, slept.stderr + stack.logs()
        assert json.loads(slept.stdout)["return"][0]["state"] == "succeeded", slept.stdout + stack.logs()
        assert _deployment_states(stack, release["id"])[device["unit_id"]] == "queued"

        stack.worker = stack.start_worker("confirm-agent")
        try:
            eventually(lambda: _deployment_states(stack, release["id"])[device["unit_id"]] == "succeeded", 60,
                       message="the succeeded report stored")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from None
        # Confirmed: the agent keeps nothing more to send.
        eventually(lambda: not list((agent.state_dir / "reports").glob("*.json")), 30,
                   message="the agent's pending reports confirmed")


# --- 200 simulated devices, the broker killed while they report --------------------------------

DEVICES = 200

# Every write of a deployment row, as the database made it: a report applied twice would write the
# same (device, reported_at) twice.
_COUNT_WRITES = """
CREATE TABLE IF NOT EXISTS deployment_write (device_id TEXT, release_id INTEGER, state TEXT, reported_at REAL);
CREATE TRIGGER IF NOT EXISTS deployment_inserted AFTER INSERT ON deployment BEGIN
    INSERT INTO deployment_write VALUES (NEW.device_id, NEW.release_id, NEW.state, NEW.reported_at); END;
CREATE TRIGGER IF NOT EXISTS deployment_updated AFTER UPDATE ON deployment BEGIN
    INSERT INTO deployment_write VALUES (NEW.device_id, NEW.release_id, NEW.state, NEW.reported_at); END;
"""


@pytest.mark.slow
def test_every_final_state_of_200_devices_is_stored_once_although_the_broker_was_killed_mid_deploy(
        restartable_broker, docker_client, tmp_path):
    with running_stack(restartable_broker.url, docker_client, tmp_path, worker_id="confirm-fleet",
                       web_workers=1) as stack:
        with sqlite3.connect(_database(stack), timeout=30) as connection:
            connection.executescript(_COUNT_WRITES)
        devices = [stack.create_device(f"sim-{n}") for n in range(DEVICES)]
        units = [device["unit_id"] for device in devices]
        fleet = Fleet(units, restartable_broker.port, processes=2, mode="threads",
                      reconnect_window=2.0, report_resend_interval=2.0)
        try:
            eventually(lambda: fleet.connected() == DEVICES, 120, 0.5, f"{DEVICES} simulated devices connected")
            project = stack.post("/docker/projects/", json={"name": f"fleet-{uuid.uuid4().hex[:6]}"}).json()
            body = release_payload([device["id"] for device in devices], "example/app", "1")
            release = stack.post(f"/docker/projects/{project['id']}/releases/", json=body).json()
            eventually(lambda: list(_deployment_states(stack, release["id"]).values()).count("queued") == DEVICES,
                       120, 0.5, "every device's queued report stored")

            # Each device deploys within 8 s and reports five steps 0.3 s apart; 2 s in, the broker is
            # killed. It comes back 2 s later, and the worker (stopped meanwhile) 3 s after that: the
            # reports the devices send on reconnecting are acknowledged by a broker nobody reads from.
            fleet.ask("deploy", 8.0)
            time.sleep(2.0)
            _kill_broker(restartable_broker)
            os.kill(stack.worker.popen.pid, signal.SIGSTOP)
            try:
                time.sleep(2.0)
                restartable_broker.container.start()
                wait_for_mqtt(restartable_broker.host, restartable_broker.port, timeout=30)
                time.sleep(3.0)
            finally:
                os.kill(stack.worker.popen.pid, signal.SIGCONT)

            def all_succeeded():
                states = _deployment_states(stack, release["id"])
                return list(states.values()).count("succeeded") == DEVICES or None

            try:
                eventually(all_succeeded, 180, 1.0, f"{DEVICES} succeeded deployments")
            except AssertionError as exc:
                states = _deployment_states(stack, release["id"])
                summary = {state: list(states.values()).count(state) for state in set(states.values())}
                raise AssertionError(f"{exc}\nstates: {summary}\n{stack.logs()}") from None

            unconfirmed = fleet.ask("unconfirmed")
            eventually(lambda: sum(u["pending"] for u in fleet.ask("unconfirmed")) == 0, 60, 0.5,
                       "every report confirmed")
            # Read once every report is confirmed: a device may still report after all succeeded
            # (a release document republished by a worker that found the broker's state lost).
            sent = {}
            for reports in fleet.ask("deployment_reports"):
                sent.update(reports)
        finally:
            fleet.stop()

        with sqlite3.connect(_database(stack), timeout=30) as connection:
            stored = dict(connection.execute(
                "SELECT device.unit_id, deployment.reported_at FROM deployment"
                " JOIN device ON device.id = deployment.device_id WHERE release_id = ?", (release["id"],)).fetchall())
            writes = connection.execute("SELECT count(*), count(DISTINCT device_id || '/' || reported_at)"
                                        " FROM deployment_write WHERE release_id = ?", (release["id"],)).fetchone()
            regressions = connection.execute(
                "SELECT count(*) FROM deployment_write AS later JOIN deployment_write AS earlier"
                " ON later.device_id = earlier.device_id AND later.rowid > earlier.rowid"
                " WHERE later.reported_at < earlier.reported_at AND later.release_id = ?", (release["id"],)).fetchone()
    # Every device's last report is what is stored, and no report was applied twice or out of order.
    mismatched = {unit: (sent[unit]["state"], sent[unit]["ts"], stored[unit]) for unit in units
                  if sent[unit]["state"] != "succeeded" or stored[unit] != sent[unit]["ts"]}
    assert not mismatched, f"last report sent and stored differ: {mismatched}"
    assert writes[0] == writes[1], f"{writes[0] - writes[1]} report(s) applied twice"
    assert regressions == (0,)
    # The broker did drop reports: the devices had to send some again.
    assert sum(u["resent"] for u in unconfirmed) > 0
