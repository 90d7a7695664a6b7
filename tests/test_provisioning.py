"""Provisioning tokens and device registration over the REST API, on a real SQLite database."""
from datetime import timedelta

import pytest

from fleet_server.extensions import db
from fleet_server.models import Device, utcnow
from fleet_server.provisioning.models import ProvisioningToken
from fleet_server.tokens import service as tokens


def _new_token(client, auth, **body):
    response = client.post("/dongle/provisioning-tokens/", json=body, headers=auth)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _register(client, token, hardware_id="hw-0001", **extra):
    return client.post("/dongle/register/", json={"token": token, "hardware_id": hardware_id, **extra})


def test_an_operator_creates_a_provisioning_token_shown_only_once(app, client, auth):
    created = _new_token(client, auth, name="van 12", expires_in=600)
    assert created["token"].startswith("fleet_prov_") and created["used_at"] is None
    listing = client.get("/dongle/provisioning-tokens/", headers=auth).get_json()
    assert listing["count"] == 1 and "token" not in listing["results"][0]
    with app.app_context():
        stored = db.session.scalars(db.select(ProvisioningToken)).one()
        assert created["token"] not in stored.token_hash and len(stored.token_hash) == 64


def test_a_viewer_cannot_create_provisioning_tokens(app, client):
    with app.app_context():
        _, value = tokens.create("viewer", role="viewer")
    response = client.post("/dongle/provisioning-tokens/", json={}, headers={"Authorization": f"APIToken {value}"})
    assert response.status_code == 403


def test_creating_a_provisioning_token_needs_an_api_token(client):
    assert client.post("/dongle/provisioning-tokens/", json={}).status_code == 401


@pytest.mark.parametrize("body, field", [({"expires_in": 10}, "expires_in"), ({"expires_in": "soon"}, "expires_in"),
                                         ({"expires_in": 10**9}, "expires_in"), ({"surprise": 1}, "surprise")])
def test_a_bad_provisioning_token_request_gets_400_naming_the_field(client, auth, body, field):
    response = client.post("/dongle/provisioning-tokens/", json=body, headers=auth)
    assert response.status_code == 400 and field in response.get_json()["errors"]


def test_registering_exchanges_the_token_for_an_identity_without_an_api_token(app, client, auth):
    token = _new_token(client, auth)["token"]
    response = _register(client, token, name="van 12")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    device = client.get(f"/dongle/devices/{body['id']}/", headers=auth).get_json()
    assert device["unit_id"] == body["unit_id"] and device["name"] == "van 12"
    # This app has no dynsec account configured: the broker URL, but no credentials to hand out.
    assert body["broker"]["url"] == app.config["FLEET_MQTT_URL"] and body["broker"]["password"] is None


def test_a_used_token_is_refused_with_a_clear_error(client, auth):
    token = _new_token(client, auth)["token"]
    assert _register(client, token).status_code == 201
    again = _register(client, token, hardware_id="hw-other")
    assert again.status_code == 401 and "already used" in again.get_json()["message"]


def test_an_expired_token_is_refused_with_a_clear_error(app, client, auth):
    token = _new_token(client, auth)["token"]
    with app.app_context():
        stored = db.session.scalars(db.select(ProvisioningToken)).one()
        stored.expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
    response = _register(client, token)
    assert response.status_code == 401 and "expired" in response.get_json()["message"]


def test_an_unknown_token_is_refused(client):
    response = _register(client, "fleet_prov_made-up")
    assert response.status_code == 401 and "not valid" in response.get_json()["message"]


def test_registering_the_same_hardware_again_does_not_duplicate_the_device(app, client, auth):
    first = _register(client, _new_token(client, auth)["token"], hardware_id="machine-42").get_json()
    second = _register(client, _new_token(client, auth)["token"], hardware_id="machine-42")
    assert second.status_code == 200
    assert (second.get_json()["id"], second.get_json()["unit_id"]) == (first["id"], first["unit_id"])
    assert client.get("/dongle/devices/", headers=auth).get_json()["count"] == 1


@pytest.mark.parametrize("hardware_id", ["", "../../etc/passwd", "a b", "x" * 201, "line\nbreak"])
def test_a_malformed_hardware_id_gets_400_and_uses_no_token(app, client, auth, hardware_id):
    token = _new_token(client, auth)["token"]
    response = _register(client, token, hardware_id=hardware_id)
    assert response.status_code == 400 and "hardware_id" in response.get_json()["errors"]
    assert _register(client, token).status_code == 201


def test_when_the_broker_cannot_make_the_account_registration_fails_cleanly_and_keeps_the_token(app, client, auth):
    # Account management on, against a port where no broker listens.
    app.config.update(FLEET_DYNSEC_USERNAME="fleet-admin", FLEET_DYNSEC_PASSWORD="x")
    token = _new_token(client, auth)["token"]
    try:
        response = _register(client, token)
    finally:
        app.extensions.pop("fleet_dynsec").close()
    assert response.status_code == 503 and "broker" in response.get_json()["message"]
    with app.app_context():
        assert db.session.scalars(db.select(ProvisioningToken)).one().used_at is None
        assert db.session.scalars(db.select(Device)).all() == []
