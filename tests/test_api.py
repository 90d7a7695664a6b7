"""The REST API on a real SQLite database: authentication, status codes, validation."""
from datetime import datetime, timedelta, timezone

import pytest

from fleet_server.tokens import service as tokens
from tests.support.stack import release_payload


@pytest.fixture
def project(client, auth):
    return client.post("/docker/projects/", json={"name": "demo"}, headers=auth).get_json()


@pytest.fixture
def device(client, auth):
    return client.post("/dongle/devices/", json={"name": "dongle"}, headers=auth).get_json()


def _release_url(project):
    return f"/docker/projects/{project['id']}/releases/"


def test_health_answers_without_a_token(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.get_json()["status"] == "ok"


@pytest.mark.parametrize("header", [None, "APIToken", "APIToken nope", "Bearer x", "Token abc"])
def test_requests_without_a_valid_token_get_401_json(client, header):
    headers = {"Authorization": header} if header else {}
    response = client.get("/docker/projects/", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["code"] == 401 and response.get_json()["message"]


def test_an_expired_token_is_refused(app, client):
    with app.app_context():
        _, value = tokens.create("old", datetime.now(timezone.utc) - timedelta(seconds=1))
    assert client.get("/docker/projects/", headers={"Authorization": f"APIToken {value}"}).status_code == 401


def test_a_token_is_stored_only_as_a_hash(app, token):
    from fleet_server.models import ApiToken
    from fleet_server.extensions import db

    with app.app_context():
        stored = db.session.scalars(db.select(ApiToken)).one()
    assert token not in stored.token_hash and len(stored.token_hash) == 64


def test_creating_a_project_returns_201_with_the_entity(client, auth):
    response = client.post("/docker/projects/", json={"name": "demo"}, headers=auth)
    assert response.status_code == 201
    body = response.get_json()
    assert body["name"] == "demo" and isinstance(body["id"], int)
    assert client.get(f"/docker/projects/{body['id']}/", headers=auth).get_json()["name"] == "demo"
    listing = client.get("/docker/projects/", headers=auth).get_json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == body["id"]


def test_registering_a_device_returns_uuid_id_and_unit_id(client, auth):
    import uuid

    response = client.post("/dongle/devices/", json={"name": "dongle"}, headers=auth)
    assert response.status_code == 201
    body = response.get_json()
    assert uuid.UUID(body["id"]) and uuid.UUID(body["unit_id"]) and body["id"] != body["unit_id"]
    assert body["docker_releases"] == []
    assert client.get(f"/dongle/devices/{body['id']}/", headers=auth).get_json()["unit_id"] == body["unit_id"]


def test_a_release_has_autopis_fields(client, auth, project, device):
    body = release_payload([device["id"]], "curveball", "delta-base-r0.0.0.1", name="curveball", required_tags=["base"])
    body["remove_containers"] = ["curveball"]
    response = client.post(_release_url(project), json=body, headers=auth)
    assert response.status_code == 201, response.get_json()
    release = response.get_json()
    assert release["version"] == "1.0.0" and release["devices"] == [device["id"]]
    assert len(release["version_hash"]) == 8 and int(release["version_hash"], 16) >= 0
    container = release["containers"][0]
    assert container["fully_qualified_name"] == f"deployment-curveball-{project['id']}"
    assert container["required_tags"] == ["base"] and container["registry"] is None
    assert release["successful_deployments"] == [] and release["remove_containers"] == ["curveball"]
    fetched = client.get(f"{_release_url(project)}{release['id']}/", headers=auth)
    assert fetched.status_code == 200 and fetched.get_json() == release


def test_the_version_hash_follows_the_content(client, auth, project, device):
    one = client.post(_release_url(project), json=release_payload([device["id"]], "app", "v1"), headers=auth).get_json()
    same = client.post(_release_url(project), json=release_payload([device["id"]], "app", "v1"), headers=auth).get_json()
    other = client.post(_release_url(project), json=release_payload([device["id"]], "app", "v2"), headers=auth).get_json()
    assert one["version_hash"] == same["version_hash"] != other["version_hash"]


def test_malformed_json_gets_400_naming_the_body(client, auth, project):
    response = client.post(_release_url(project), data="{not json", content_type="application/json", headers=auth)
    assert response.status_code == 400
    assert response.get_json()["errors"]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda b: b.pop("version"), "version"),
        (lambda b: b.pop("containers"), "containers"),
        (lambda b: b.update(devices="not-a-list"), "devices"),
        (lambda b: b.update(version=12), "version"),
        (lambda b: b.update(containers=[]), "containers"),
        (lambda b: b.update(surprise=True), "surprise"),
        (lambda b: b["containers"][0].pop("image"), "containers"),
        (lambda b: b["containers"][0].update(tag="bad tag!"), "containers"),
        (lambda b: b["containers"][0].update(registry="1"), "containers"),
        (lambda b: b["containers"][0]["startup_parameters"].update(binds=["relative:/x"]), "containers"),
        (lambda b: b["containers"][0]["startup_parameters"].update(restart_policy="sometimes"), "containers"),
        (lambda b: b["containers"][0]["startup_parameters"].update(environment="KEY='unclosed"), "containers"),
        (lambda b: b["containers"][0]["startup_parameters"].update(privileged="very"), "containers"),
    ],
)
def test_a_bad_release_gets_400_naming_the_field(client, auth, project, device, change, field):
    body = release_payload([device["id"]], "app", "v1")
    change(body)
    response = client.post(_release_url(project), json=body, headers=auth)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()
    assert field in error["errors"], error
    assert error["code"] == 400 and error["message"]


def test_an_unknown_device_in_a_release_gets_400_naming_devices(client, auth, project):
    response = client.post(
        _release_url(project), json=release_payload(["7d3c9e4e-0000-4000-8000-000000000000"], "app", "v1"), headers=auth
    )
    assert response.status_code == 400
    assert "devices" in response.get_json()["errors"]


def test_an_unknown_registry_gets_400_naming_the_container(client, auth, project, device):
    response = client.post(
        _release_url(project), json=release_payload([device["id"]], "app", "v1", registry=42), headers=auth
    )
    assert response.status_code == 400
    assert "containers.0.registry" in response.get_json()["errors"]


def test_missing_things_are_404_json(client, auth, project):
    assert client.get("/docker/projects/999/", headers=auth).status_code == 404
    assert client.get(f"{_release_url(project)}999/", headers=auth).status_code == 404
    assert client.post("/docker/projects/999/releases/", json=release_payload([], "a", "b"), headers=auth).status_code == 404
    missing = client.get("/dongle/devices/7d3c9e4e-0000-4000-8000-000000000000/", headers=auth)
    assert missing.status_code == 404 and missing.get_json()["message"]


def test_creating_a_release_queues_a_publication_while_the_broker_is_away(app, client, auth, project, device):
    from fleet_server.extensions import db
    from fleet_server.models import Publication

    response = client.post(_release_url(project), json=release_payload([device["id"]], "app", "v1"), headers=auth)
    assert response.status_code == 201
    with app.app_context():
        pending = db.session.scalars(db.select(Publication)).all()
        assert [(p.unit_id, p.project_id) for p in pending] == [(device["unit_id"], project["id"])]
