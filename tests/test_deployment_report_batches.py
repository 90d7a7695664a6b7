"""Deployment reports stored a batch at a time keep each report's own meaning (SQLite and PostgreSQL).

`ingest.handle_batch` reads what checking a batch's deployment reports needs in a couple of
queries and writes them together; these tests hand it batches the worker could receive and
read the rows it stored.
"""
import time

import pytest
from sqlalchemy import event

import fleet_wire as wire
from fleet_server.messaging import ingest
from fleet_server.extensions import db
from fleet_server.models import Deployment
from tests.support.stack import release_payload


@pytest.fixture
def fleet(client, auth):
    """Three devices; project p with releases v1 and v2 for all three and v3 for the first only; project q."""
    def post(path, body):
        response = client.post(path, json=body, headers=auth)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    devices = [post("/dongle/devices/", {"name": f"d{i}"}) for i in range(3)]
    ids = [device["id"] for device in devices]
    p = post("/docker/projects/", {"name": "p"})
    q = post("/docker/projects/", {"name": "q"})
    releases = {tag: post(f"/docker/projects/{p['id']}/releases/", release_payload(ids, "app", tag))
                for tag in ("v1", "v2")}
    releases["v3"] = post(f"/docker/projects/{p['id']}/releases/", release_payload(ids[:1], "app", "v3"))
    releases["q1"] = post(f"/docker/projects/{q['id']}/releases/", release_payload(ids, "other", "q1"))
    return {"devices": devices, "releases": releases}


def _report(fleet, device: int, release: str, state: str, ts: float, project_id=None, detail=""):
    release = fleet["releases"][release]
    body = {"project_id": project_id or release["project"], "release_id": release["id"],
            "version_hash": release["version_hash"], "state": state, "step": None, "detail": detail, "ts": ts}
    topic = wire.device_topic(fleet["devices"][device]["unit_id"], "deployments")
    return topic, wire.encode(wire.from_builtins(wire.DeploymentReport, body))


def _stored(fleet) -> dict:
    """{(release tag, device index): (state, reported_at)} of every deployment row."""
    tag_of = {release["id"]: tag for tag, release in fleet["releases"].items()}
    index_of = {device["id"]: index for index, device in enumerate(fleet["devices"])}
    rows = db.session.execute(db.select(Deployment.release_id, Deployment.device_id, Deployment.state,
                                        Deployment.reported_at)).all()
    db.session.remove()
    return {(tag_of[release_id], index_of[device_id]): (state, reported_at)
            for release_id, device_id, state, reported_at in rows}


def test_two_reports_for_one_deployment_in_one_batch_leave_the_newer_in_either_order(app, fleet):
    now = time.time()
    with app.app_context():
        in_order = [_report(fleet, 0, "v1", "queued", now), _report(fleet, 0, "v1", "pulling", now + 1)]
        out_of_order = [_report(fleet, 1, "v1", "pulling", now + 1), _report(fleet, 1, "v1", "queued", now)]
        assert ingest.handle_batch(in_order + out_of_order) == [True] * 4
        assert _stored(fleet) == {("v1", 0): ("pulling", now + 1), ("v1", 1): ("pulling", now + 1)}


def test_a_rejected_report_amid_good_ones_is_the_only_one_not_stored(app, fleet):
    now = time.time()
    batch = [_report(fleet, 0, "v1", "queued", now),
             _report(fleet, 1, "v3", "queued", now),  # v3 does not target device 1 (and one of no release below)
             _report(fleet, 1, "v1", "queued", now),
             _report(fleet, 2, "q1", "queued", now, project_id=fleet["releases"]["v1"]["project"]),  # other project
             _report(fleet, 2, "v1", "queued", now)]
    topic, payload = _report(fleet, 0, "v2", "queued", now)
    batch.insert(1, (topic, payload.replace(b'"release_id":%d' % fleet["releases"]["v2"]["id"],
                                            b'"release_id":%d' % (fleet["releases"]["q1"]["id"] + 100))))
    with app.app_context():
        assert ingest.handle_batch(batch) == [True, False, False, True, False, True]
        assert _stored(fleet) == {("v1", 0): ("queued", now), ("v1", 1): ("queued", now), ("v1", 2): ("queued", now)}


def test_a_new_and_an_existing_deployment_in_one_batch_are_both_stored(app, fleet):
    now = time.time()
    with app.app_context():
        assert ingest.handle_batch([_report(fleet, 0, "v1", "queued", now)]) == [True]
        batch = [_report(fleet, 0, "v1", "pulling", now + 1), _report(fleet, 1, "v1", "queued", now + 1),
                 _report(fleet, 0, "v2", "queued", now + 1)]
        assert ingest.handle_batch(batch) == [True] * 3
        assert _stored(fleet) == {("v1", 0): ("pulling", now + 1), ("v1", 1): ("queued", now + 1),
                                  ("v2", 0): ("queued", now + 1)}


def test_an_older_report_in_a_later_batch_does_not_overwrite_a_stored_newer_one(app, fleet):
    now = time.time()
    with app.app_context():
        first = [_report(fleet, 0, "v1", "pulling", now + 1), _report(fleet, 1, "v1", "queued", now)]
        assert ingest.handle_batch(first) == [True, True]
        assert ingest.handle_batch([_report(fleet, 0, "v1", "queued", now),
                                    _report(fleet, 1, "v1", "queued", now)]) == [True, True]
        assert _stored(fleet) == {("v1", 0): ("pulling", now + 1), ("v1", 1): ("queued", now)}


def test_succeeded_in_a_batch_supersedes_what_the_same_batch_stored_before_it(app, fleet):
    now = time.time()
    batch = [_report(fleet, 0, "v1", "succeeded", now), _report(fleet, 1, "v1", "succeeded", now),
             _report(fleet, 0, "v2", "queued", now + 1), _report(fleet, 0, "v2", "succeeded", now + 2)]
    with app.app_context():
        assert ingest.handle_batch(batch) == [True] * 4
        assert _stored(fleet) == {("v1", 0): ("superseded", now), ("v1", 1): ("succeeded", now),
                                  ("v2", 0): ("succeeded", now + 2)}


def test_a_repeated_succeeded_report_after_a_newer_release_succeeded_in_the_batch_takes_over_again(app, fleet):
    # The v1 row this batch read as succeeded is superseded mid-batch; its repeated report, not
    # older than what is stored, makes it succeeded again and supersedes v2, as one by one would.
    now = time.time()
    with app.app_context():
        assert ingest.handle_batch([_report(fleet, 0, "v1", "succeeded", now)])
        assert ingest.handle_batch([_report(fleet, 0, "v2", "succeeded", now + 1),
                                    _report(fleet, 0, "v1", "succeeded", now)]) == [True, True]
        assert _stored(fleet) == {("v1", 0): ("succeeded", now), ("v2", 0): ("superseded", now + 1)}


def test_a_batch_of_queued_reports_costs_a_few_statements_not_a_few_per_report(app, fleet):
    now = time.time()
    statements = []
    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        batch = [_report(fleet, device, tag, "queued", now) for device in range(3) for tag in ("v1", "v2")]
        assert ingest.handle_batch(batch) == [True] * 6
        writes = [statement for statement in statements if statement.lstrip().upper().startswith(("INSERT", "UPDATE"))]
        # Device lookup, the releases' projects, the targeted pairs with their deployments, one INSERT
        # (and on SQLite the BEGIN IMMEDIATE): whatever the batch's size.
        assert len(statements) <= 5, statements
        assert len(writes) == 1 and "SAVEPOINT" not in " ".join(statements).upper()
        assert len(_stored(fleet)) == 6
