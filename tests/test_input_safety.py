"""Hostile values: the topic names the device (never the payload), and paths cannot climb out."""
import json
import time

import pytest

import fleet_wire as wire
from fleet_server.messaging import ingest
from fleet_server.extensions import db
from fleet_server.models import Deployment, Device
from tests.support.stack import release_payload


@pytest.fixture
def fleet(client, auth):
    """Devices A and B, a release for B only and a release for both."""
    a = client.post("/dongle/devices/", json={"name": "A"}, headers=auth).get_json()
    b = client.post("/dongle/devices/", json={"name": "B"}, headers=auth).get_json()
    project = client.post("/docker/projects/", json={"name": "p"}, headers=auth).get_json()
    url = f"/docker/projects/{project['id']}/releases/"
    only_b = client.post(url, json=release_payload([b["id"]], "app", "v1"), headers=auth).get_json()
    both = client.post(url, json=release_payload([a["id"], b["id"]], "app", "v2"), headers=auth).get_json()
    return {"A": a, "B": b, "project": project, "only_b": only_b, "both": both}


def _report(project_id, release_id, state="succeeded"):
    return wire.encode(wire.from_builtins(wire.DeploymentReport, {"project_id": project_id, "release_id": release_id, "state": state,
                                                "step": "verify", "detail": "", "ts": time.time()}))


def test_a_report_on_device_as_topic_naming_device_bs_release_is_rejected_and_writes_nothing(app, fleet):
    topic = wire.device_topic(fleet["A"]["unit_id"], "deployments")
    with app.app_context():
        assert ingest.handle_message(topic, _report(fleet["project"]["id"], fleet["only_b"]["id"])) is False
        assert db.session.scalars(db.select(Deployment)).all() == []


def test_a_report_on_device_as_topic_changes_only_device_as_records(app, client, auth, fleet):
    topic = wire.device_topic(fleet["A"]["unit_id"], "deployments")
    # Whatever device the payload claims to be, the topic decides.
    payload = json.loads(_report(fleet["project"]["id"], fleet["both"]["id"]))
    payload.update(device_id=fleet["B"]["id"], unit_id=fleet["B"]["unit_id"])
    with app.app_context():
        assert ingest.handle_message(topic, json.dumps(payload).encode()) is True
    release = client.get(f"/docker/projects/{fleet['project']['id']}/releases/{fleet['both']['id']}/", headers=auth)
    assert release.get_json()["successful_deployments"] == [fleet["A"]["id"]]
    assert client.get(f"/dongle/devices/{fleet['B']['id']}/", headers=auth).get_json()["docker_releases"] == []


def test_a_status_on_device_as_topic_claiming_to_be_b_marks_only_a_online(app, fleet):
    topic = wire.device_topic(fleet["A"]["unit_id"], "status")
    payload = json.dumps({"v": 1, "state": "online", "unit_id": fleet["B"]["unit_id"], "ts": time.time()}).encode()
    with app.app_context():
        assert ingest.handle_message(topic, payload) is True
        online = {d.name: d.online for d in db.session.scalars(db.select(Device))}
    assert online == {"A": True, "B": False}


@pytest.mark.parametrize("bind", ["/data/../etc:/x", "/data:/x/../../y", "data:/x", "/data:x", "/a:/b:rwx", "/a", "/a\x00b:/c"])
def test_a_release_with_an_unsafe_bind_gets_400(client, auth, fleet, bind):
    body = release_payload([fleet["A"]["id"]], "app", "v1", startup_parameters={"binds": [bind]})
    response = client.post(f"/docker/projects/{fleet['project']['id']}/releases/", json=body, headers=auth)
    assert response.status_code == 400
    assert any(key.split(".")[0] == "containers" for key in response.get_json()["errors"]), response.get_json()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "-flag", "a b", "x" * 101, ""])
def test_a_release_with_an_unsafe_container_name_gets_400(client, auth, fleet, name):
    body = release_payload([fleet["A"]["id"]], "app", "v1", name=name)
    response = client.post(f"/docker/projects/{fleet['project']['id']}/releases/", json=body, headers=auth)
    assert response.status_code == 400
    assert any(key.split(".")[0] == "containers" for key in response.get_json()["errors"]), response.get_json()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_a_release_removing_an_unsafe_container_name_gets_400(client, auth, fleet, name):
    body = release_payload([fleet["A"]["id"]], "app", "v1")
    body["remove_containers"] = [name]
    response = client.post(f"/docker/projects/{fleet['project']['id']}/releases/", json=body, headers=auth)
    assert response.status_code == 400 and "remove_containers" in response.get_json()["errors"]


def _release_message(**container):
    spec = {"name": "a", "image": "i", "tag": "t", "fully_qualified_name": "deployment-a-1", **container}
    return {"project_id": 1, "release": {"id": 1, "version": "1", "version_hash": "0123abcd", "containers": [spec]},
            "registries": [{"id": 1, "url": "registry.example:5000"}]}


def _decode(message) -> dict:
    return wire.decode(wire.ReleaseMessage, json.dumps({"v": 1, **message}).encode())


@pytest.mark.parametrize("container", [
    {"startup_parameters": {"binds": ["/data/../../etc:/x"]}},
    {"startup_parameters": {"binds": ["relative:/x"]}},
    {"name": "../a"},
    {"fully_qualified_name": "../../etc"},
    {"fully_qualified_name": "a/b"},
])
def test_the_agent_rejects_a_release_document_with_unsafe_paths_or_names(container):
    with pytest.raises(wire.WireError):
        _decode(_release_message(**container))


@pytest.mark.parametrize("url", ["registry.example:5000/../../v2", "https://user:pw@registry.example", "file:///etc/passwd",
                                 "registry.example/path", "registry.example:5000?x=1", "evil.example\nHost: x", ""])
def test_the_agent_rejects_an_unsafe_registry_url(url):
    message = _release_message()
    message["registries"][0]["url"] = url
    with pytest.raises(wire.WireError):
        _decode(message)


@pytest.mark.parametrize("url", ["registry.example:5000", "https://registry.example", "http://127.0.0.1:5000/",
                                 "[::1]:5000"])
def test_the_agent_accepts_a_plain_registry_address(url):
    message = _release_message()
    message["registries"][0]["url"] = url
    assert _decode(message).registries[0].url == url
