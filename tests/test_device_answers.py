"""The device list and retrieve answers, encoded by msgspec, are what DeviceSchema dumps: the same keys in the same order, equal values.

DeviceSchema (and DevicePage) stay the documented contract; the hot read paths encode their
answer from Core rows through the Structs declared beside them (fleet_server/devices/schemas.py).
msgspec writes non-ASCII text as UTF-8 where Flask's provider escaped it: equal values, not equal bytes. Each test runs on SQLite
and on PostgreSQL, with devices that exercise every field: timestamps with and without
microseconds, none, non-ASCII text, empty and several tags, and deployments in every state.
"""
import json
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest

from fleet_server.devices.schemas import DeviceListArgs, DevicePage, DeviceSchema
from fleet_server.extensions import db
from fleet_server.models import ApiToken, Deployment, Device, Project, Release
from fleet_server.pagination import paginate
from fleet_server.tokens import service as tokens
from tests.support.stack import close_app, make_app

EPOCH = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def fleet(app):
    """Five devices unlike each other, and releases deployed to them in every state; returns their ids."""
    with app.app_context():
        project = Project(name="demo")
        releases = [Release(project=project, version=f"1.{n}", version_hash=f"{n:08x}") for n in range(4)]
        devices = [
            Device(name="plain", created_at=EPOCH),
            Device(name="café ☕ \"quoted\" \\ <b>", description="line\nbreak\ttab", tags=["north", "ünï", "x" * 100],
                   created_at=EPOCH + timedelta(microseconds=1), last_seen_at=EPOCH + timedelta(days=1),
                   online=True, agent_version="1.2.3"),
            Device(name="same-time", created_at=EPOCH + timedelta(microseconds=1), online=False,
                   last_seen_at=EPOCH + timedelta(seconds=5, microseconds=999999), agent_version=""),
            Device(name="runs-three", tags=[], created_at=EPOCH + timedelta(hours=2)),
            Device(name="plain", created_at=EPOCH + timedelta(hours=3), online=True),
        ]
        db.session.add_all([project, *releases, *devices])
        db.session.flush()
        states = {"runs-three": ["succeeded", "succeeded", "failed", "succeeded"], "plain": ["queued", "succeeded"]}
        for device in devices:
            for release, state in zip(reversed(releases), states.get(device.name, [])):
                db.session.add(Deployment(release_id=release.id, device_id=device.id, state=state))
        db.session.commit()
        return [device.id for device in devices]


def devices_query(unit_id=None, name=None, online=None):
    """The device list as ORM objects in the list's order: what DevicePage is dumped from here."""
    statement = db.select(Device).order_by(Device.created_at, Device.id)
    if unit_id is not None:
        statement = statement.filter_by(unit_id=str(unit_id))
    if name is not None:
        statement = statement.filter_by(name=name)
    if online is not None:
        statement = statement.filter_by(online=online)
    return statement


def _pairs(body: bytes):
    """The JSON's value with every object as its list of (key, value) pairs: equal only with the keys in the same order."""
    return json.loads(body, object_pairs_hook=list)


def _schema_answer(app, path, build):
    """The JSON the marshmallow schema path gives for `path`, built the way flask-smorest does."""
    parts = urlsplit(path)
    with app.test_request_context(parts.path, query_string=parts.query):
        return app.json.response(build()).get_data()


def test_a_retrieved_device_is_what_device_schema_dumps(app, client, auth, fleet):
    for device_id in fleet:
        answer = client.get(f"/dongle/devices/{device_id}/", headers=auth)
        assert answer.status_code == 200
        expected = _schema_answer(app, "/", lambda: DeviceSchema().dump(db.session.get(Device, device_id)))
        assert _pairs(answer.get_data()) == _pairs(expected)


def test_a_device_running_releases_lists_only_the_succeeded_ones_in_order(client, auth, fleet):
    runs_three = client.get(f"/dongle/devices/{fleet[3]}/", headers=auth).get_json()
    assert len(runs_three["docker_releases"]) == 3 and runs_three["docker_releases"] == sorted(
        runs_three["docker_releases"])
    assert client.get(f"/dongle/devices/{fleet[2]}/", headers=auth).get_json()["docker_releases"] == []


@pytest.mark.parametrize("query", [
    "", "?limit=2", "?limit=2&offset=2", "?limit=2&offset=4", "?offset=5", "?offset=50", "?limit=1000",
    "?name=plain", "?name=plain&limit=1&offset=1", "?name=nobody", "?online=true", "?online=false&limit=2",
])
def test_a_device_page_is_what_device_page_dumps(app, client, auth, fleet, query):
    path = f"/dongle/devices/{query}"
    answer = client.get(path, headers=auth)
    assert answer.status_code == 200

    def schema_page():
        from flask import request

        args = DeviceListArgs().load(request.args)
        limit, offset = args.pop("limit"), args.pop("offset")
        return DevicePage().dump(paginate(devices_query(**args), limit, offset))

    assert _pairs(answer.get_data()) == _pairs(_schema_answer(app, path, schema_page))
    assert answer.get_json()["results"] or query in ("?offset=5", "?offset=50", "?name=nobody")


def test_a_device_page_filtered_by_unit_id_is_what_device_page_dumps(app, client, auth, fleet):
    with app.app_context():
        unit_id = db.session.get(Device, fleet[1]).unit_id
    path = f"/dongle/devices/?unit_id={unit_id}"
    answer = client.get(path, headers=auth)
    expected = _schema_answer(app, path, lambda: DevicePage().dump(paginate(devices_query(unit_id=unit_id), 100, 0)))
    assert _pairs(answer.get_data()) == _pairs(expected) and answer.get_json()["count"] == 1


def test_retrieving_a_device_that_does_not_exist_is_a_404_naming_it(client, auth):
    answer = client.get("/dongle/devices/734c361a-ba56-472a-a891-ee2af1a80570/", headers=auth)
    assert answer.status_code == 404 and "734c361a-ba56-472a-a891-ee2af1a80570" in answer.get_json()["message"]


def test_a_token_revoked_through_another_server_process_is_refused_on_the_next_request(app, client, tmp_path):
    # A second app has its own engine and connection pool, as another gunicorn worker would.
    other_process = make_app(app.config["SQLALCHEMY_DATABASE_URI"], tmp_path / "other")
    try:
        with other_process.app_context():
            token, value = tokens.create("ci", role="viewer")
            token_id = token.id
        headers = {"Authorization": f"APIToken {value}"}
        assert client.get("/dongle/devices/", headers=headers).status_code == 200
        with other_process.app_context():
            tokens.revoke(token_id)
        assert client.get("/dongle/devices/", headers=headers).status_code == 401
    finally:
        close_app(other_process)


def test_a_token_that_expires_between_two_requests_is_refused_on_the_second(app, client):
    with app.app_context():
        token, value = tokens.create("short", expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
        token_id = token.id
    headers = {"Authorization": f"APIToken {value}"}
    assert client.get("/dongle/devices/", headers=headers).status_code == 200
    with app.app_context():
        db.session.get(ApiToken, token_id).expires_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        db.session.commit()
    assert client.get("/dongle/devices/", headers=headers).status_code == 401


def test_device_rows_written_without_sqlalchemy_are_answered_as_device_schema_dumps_them(app, client, auth):
    # Timestamps without a fraction or with trailing zeros, and tags with spaces around them: text that
    # SQLAlchemy does not write itself (on SQLite the answer is written from the stored text).
    with app.app_context():
        db.session.execute(db.text(
            "INSERT INTO device (id, unit_id, name, description, tags, created_at, last_seen_at, online) "
            "VALUES (:id, :unit_id, 'by hand', '', :tags, :created_at, :last_seen_at, :online)"),
            [{"id": "00000000-0000-4000-8000-00000000000a", "unit_id": "00000000-0000-4000-8000-0000000000aa",
              "tags": ' [ "b" , "ä" ] ', "created_at": "2026-03-01 12:00:00",
              "last_seen_at": "2026-03-01 12:00:00.120000", "online": True},
             {"id": "00000000-0000-4000-8000-00000000000b", "unit_id": "00000000-0000-4000-8000-0000000000bb",
              "tags": "[]", "created_at": "2026-03-01 12:00:01.000000", "last_seen_at": None, "online": False}])
        db.session.commit()
    answer = client.get("/dongle/devices/", headers=auth)
    expected = _schema_answer(app, "/dongle/devices/", lambda: DevicePage().dump(paginate(devices_query(), 100, 0)))
    assert _pairs(answer.get_data()) == _pairs(expected)
    assert [device["tags"] for device in answer.get_json()["results"]] == [["b", "ä"], []]
    retrieved = client.get("/dongle/devices/00000000-0000-4000-8000-00000000000a/", headers=auth)
    assert retrieved.get_json()["last_seen_at"] == "2026-03-01T12:00:00.120000+00:00"
