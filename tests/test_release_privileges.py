"""Privilege is an admin's decision: over real HTTP, on SQLite and PostgreSQL, an operator's release that
would give a container power over its devices gets 403 naming the field; the same release from an admin is created."""
import subprocess

import pytest

from fleet_device.release_policy import DATA_ROOT, LOCK_ROOT
from fleet_server.app import create_app
from fleet_server.config import ConfigError
from tests.support.stack import LiveServer, _command, make_app, release_payload, server_env


@pytest.fixture
def fleet(live):
    """A project and a device, and an operator's token beside the admin's."""
    project = live.post("/docker/projects/", json={"name": "demo"}).json()
    device = live.post("/dongle/devices/", json={"name": "dongle"}).json()
    return {"project": project, "device": device, "url": f"/docker/projects/{project['id']}/releases/",
            "operator": live.create_token(role="operator", name="operator")}


def parameters(**changes):
    return {"environment": "", "binds": [], "network_mode": "none", "restart_policy": "no", "privileged": False,
            **changes}


def body_with(fleet, **changes):
    return release_payload([fleet["device"]["id"]], "app", "v1", startup_parameters=parameters(**changes))


def patch_containers(fleet, **changes):
    return body_with(fleet, **changes)["containers"]


def assert_forbidden(response, field):
    assert response.status_code == 403, response.text
    body = response.json()
    assert set(body) == {"code", "status", "message", "errors"} and body["code"] == 403
    assert field in body["errors"] and field in body["message"] and "admin" in body["message"], body
    return body


FIELD = "containers.0.startup_parameters."


@pytest.mark.parametrize("changes, field", [
    ({"privileged": True}, FIELD + "privileged"),
    ({"network_mode": "host"}, FIELD + "network_mode"),
    ({"network_mode": "container:deployment-db-1"}, FIELD + "network_mode"),
    ({"binds": [f"{DATA_ROOT}/app:/data", "/home/balenaEngine/data:/data2"]}, FIELD + "binds.1"),
    ({"binds": ["/:/host"]}, FIELD + "binds.0"),
    ({"binds": ["/var/run/docker.sock:/var/run/docker.sock"]}, FIELD + "binds.0"),
    ({"binds": ["//run//docker.sock/:/docker.sock"]}, FIELD + "binds.0"),
    ({"binds": ["/var/lib/fleet-device/data-evil:/data"]}, FIELD + "binds.0"),
])
def test_an_operator_may_not_create_a_release_with_power_over_the_device_but_an_admin_may(live, fleet, changes, field):
    body = body_with(fleet, **changes)
    assert_forbidden(live.post(fleet["url"], json=body, token=fleet["operator"]), field)
    assert live.get(fleet["url"]).json()["count"] == 0
    created = live.post(fleet["url"], json=body)  # the admin's token
    assert created.status_code == 201, created.text


def test_an_operator_may_not_remove_a_container_fleet_does_not_manage_but_an_admin_may(live, fleet):
    body = body_with(fleet)
    body["remove_containers"] = ["curveball"]
    assert_forbidden(live.post(fleet["url"], json=body, token=fleet["operator"]), "remove_containers.0")
    assert live.post(fleet["url"], json=body).status_code == 201


def test_an_operator_may_remove_a_container_of_any_release_of_any_project(live, fleet):
    other = live.post("/docker/projects/", json={"name": "other"}).json()
    elsewhere = live.post(f"/docker/projects/{other['id']}/releases/",
                          json=release_payload([], "db", "v1", name="db"))
    assert elsewhere.status_code == 201, elsewhere.text
    body = body_with(fleet)
    body["remove_containers"] = [f"deployment-db-{other['id']}", f"deployment-app-{fleet['project']['id']}"]
    created = live.post(fleet["url"], json=body, token=fleet["operator"])
    assert created.status_code == 201, created.text
    # A name of the same shape that no release ever had is not Fleet's.
    body["remove_containers"] = [f"deployment-web-{other['id']}"]
    assert_forbidden(live.post(fleet["url"], json=body, token=fleet["operator"]), "remove_containers.0")


def test_an_operator_may_create_an_unprivileged_release_binding_the_data_root_and_the_lock_directory(live, fleet):
    body = body_with(fleet, network_mode="bridge",
                     binds=[f"{DATA_ROOT}/app:/data", f"{DATA_ROOT}//cache/:/cache:rw", f"{LOCK_ROOT}:/locks:ro"])
    created = live.post(fleet["url"], json=body, token=fleet["operator"])
    assert created.status_code == 201, created.text


def test_every_field_that_needs_admin_is_named_at_once(live, fleet):
    body = body_with(fleet, privileged=True, network_mode="host", binds=["/etc:/etc"])
    body["remove_containers"] = ["legacy"]
    errors = assert_forbidden(live.post(fleet["url"], json=body, token=fleet["operator"]), FIELD + "privileged")["errors"]
    assert set(errors) == {FIELD + "privileged", FIELD + "network_mode", FIELD + "binds.0", "remove_containers.0"}


def test_an_operator_may_not_make_a_release_privileged_by_put_or_patch(live, fleet):
    created = live.post(fleet["url"], json=body_with(fleet), token=fleet["operator"])
    assert created.status_code == 201, created.text
    item = f"{fleet['url']}{created.json()['id']}/"
    assert_forbidden(live.put(item, json=body_with(fleet, privileged=True), token=fleet["operator"]), FIELD + "privileged")
    patch = {"containers": patch_containers(fleet, network_mode="host")}
    assert_forbidden(live.patch(item, json=patch, token=fleet["operator"]), FIELD + "network_mode")
    patch = {"remove_containers": ["legacy"]}
    assert_forbidden(live.patch(item, json=patch, token=fleet["operator"]), "remove_containers.0")
    assert live.get(item).json()["version_hash"] == created.json()["version_hash"]
    assert live.patch(item, json={"containers": patch_containers(fleet, privileged=True)}).status_code == 200


def test_an_operator_may_not_retarget_or_rename_an_admins_privileged_release(live, fleet):
    created = live.post(fleet["url"], json=body_with(fleet, privileged=True))
    assert created.status_code == 201, created.text
    item = f"{fleet['url']}{created.json()['id']}/"
    assert_forbidden(live.patch(item, json={"version": "1.0.1"}, token=fleet["operator"]), FIELD + "privileged")
    assert_forbidden(live.patch(item, json={"devices": []}, token=fleet["operator"]), FIELD + "privileged")
    # Deleting it takes power away: an operator may.
    assert live.delete(item, token=fleet["operator"]).status_code == 204


def test_the_server_allows_operators_the_bind_roots_it_is_configured_with(database_url, broker, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_ALLOWED_BIND_ROOTS", "/srv/fleet/:/media//usb")
    server = LiveServer(make_app(database_url, tmp_path, broker.url), token="")
    try:
        server.token = server.create_token(role="operator")
        project = server.post("/docker/projects/", json={"name": "demo"}).json()
        url = f"/docker/projects/{project['id']}/releases/"
        inside = release_payload([], "app", "v1", startup_parameters=parameters(
            binds=["/srv/fleet/app:/data", "/media/usb:/usb:ro"]))
        assert server.post(url, json=inside).status_code == 201
        outside = release_payload([], "app", "v2", startup_parameters=parameters(binds=[f"{DATA_ROOT}:/data"]))
        assert_forbidden(server.post(url, json=outside), FIELD + "binds.0")
    finally:
        server.stop()


@pytest.mark.parametrize("value, named", [
    ("var/lib/data", "'var/lib/data'"),
    ("/srv/../etc", "'/srv/../etc'"),
    ("/run/docker.sock", "socket"),
])
def test_a_bad_bind_roots_setting_stops_the_server_with_one_line_naming_it(tmp_path, value, named):
    with pytest.raises(ConfigError) as caught:
        create_app({"FLEET_ALLOWED_BIND_ROOTS": value, "FLEET_VAR_DIR": str(tmp_path),
                    "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'fleet.db'}"})
    assert str(caught.value).startswith("FLEET_ALLOWED_BIND_ROOTS: ") and named in str(caught.value)
    env = {**server_env(tmp_path, "mqtt://127.0.0.1:1"), "FLEET_ALLOWED_BIND_ROOTS": value}
    result = subprocess.run(_command("fleet-server") + ["db", "upgrade"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if "FLEET_ALLOWED_BIND_ROOTS" in line], result.stderr
