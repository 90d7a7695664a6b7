"""The complete REST API over real HTTP, on SQLite and on PostgreSQL, with releases published to the real broker."""
import json
import threading
import time
import uuid

import pytest

import fleet_wire as wire
from tests.support.infra import close_mqtt, connect_mqtt, subscribe_and_wait
from tests.support.stack import release_payload


def retained(broker, topic, settle=0.4):
    """The retained payload on a topic (b"" never: None when the topic holds nothing)."""
    received = []
    client, _ = connect_mqtt(broker.host, broker.port, on_message=lambda c, u, m: received.append(m.payload))
    try:
        subscribe_and_wait(client, topic)
        time.sleep(settle)  # retained messages follow the SUBACK at once
    finally:
        close_mqtt(client)
    return json.loads(received[-1]) if received else None


@pytest.fixture
def project(live):
    response = live.post("/docker/projects/", json={"name": "demo"})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def device(live):
    response = live.post("/dongle/devices/", json={"name": "dongle", "tags": ["north"]})
    assert response.status_code == 201, response.text
    return response.json()


def releases_url(project):
    return f"/docker/projects/{project['id']}/releases/"


def create_release(live, project, devices, tag="v1", **container):
    response = live.post(releases_url(project), json=release_payload([d["id"] for d in devices], "app", tag, **container))
    assert response.status_code == 201, response.text
    return response.json()


def assert_error(response, status, field=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "status", "message", "errors"} and body["code"] == status and body["message"]
    if field is not None:
        assert field in body["errors"], body
    return body


# --- registries ---------------------------------------------------------------------------------------


def test_a_registry_password_is_write_only_and_encrypted_at_rest(live):
    created = live.post("/docker/registries/", json={"name": "private", "url": "127.0.0.1:5000",
                                                      "username": "deploy", "password": "hunter2-secret"})
    assert created.status_code == 201, created.text
    registry = created.json()
    assert "password" not in registry and registry["username"] == "deploy"
    for response in (live.get(f"/docker/registries/{registry['id']}/"), live.get("/docker/registries/"),
                     live.patch(f"/docker/registries/{registry['id']}/", json={"name": "renamed"})):
        assert response.status_code == 200 and "hunter2-secret" not in response.text
    from fleet_server.encryption import decrypt
    from fleet_server.extensions import db
    from fleet_server.models import Registry

    with live.app.app_context():
        stored = db.session.get(Registry, registry["id"])
        assert "hunter2" not in stored.password_encrypted and decrypt(stored.password_encrypted) == "hunter2-secret"


def test_a_registry_can_be_replaced_and_deleted(live):
    registry = live.post("/docker/registries/", json={"name": "r", "url": "https://registry.example:5000"}).json()
    replaced = live.put(f"/docker/registries/{registry['id']}/", json={"name": "r2", "url": "registry.example:443"})
    assert replaced.status_code == 200 and replaced.json()["url"] == "registry.example:443"
    assert live.delete(f"/docker/registries/{registry['id']}/").status_code == 204
    assert_error(live.get(f"/docker/registries/{registry['id']}/"), 404)


@pytest.mark.parametrize("body, field", [
    ({"name": "r", "url": "not a url"}, "url"),
    ({"name": "r", "url": "ftp://host"}, "url"),
    ({"url": "host:5000"}, "name"),
    ({"name": "r", "url": "host:5000", "secret": "x"}, "secret"),
])
def test_a_bad_registry_gets_400_naming_the_field(live, body, field):
    assert_error(live.post("/docker/registries/", json=body), 400, field)


def test_a_registry_in_use_cannot_be_deleted_and_the_409_names_the_releases(live, project, device):
    registry = live.post("/docker/registries/", json={"name": "r", "url": "127.0.0.1:5000"}).json()
    release = create_release(live, project, [device], registry=registry["id"])
    body = assert_error(live.delete(f"/docker/registries/{registry['id']}/"), 409, "releases")
    assert body["errors"]["releases"] == [str(release["id"])]


def test_the_release_document_carries_decrypted_credentials_on_the_device_topic_only(live, broker, project, device):
    registry = live.post("/docker/registries/", json={"name": "r", "url": "127.0.0.1:5000",
                                                      "username": "u", "password": "pw-1"}).json()
    other = live.post("/dongle/devices/", json={"name": "other"}).json()
    create_release(live, project, [device], registry=registry["id"])
    create_release(live, project, [other])
    message = retained(broker, wire.release_topic(device["unit_id"], project["id"]))
    assert message["registries"] == [{"id": registry["id"], "url": "127.0.0.1:5000", "username": "u", "password": "pw-1"}]
    assert retained(broker, wire.release_topic(other["unit_id"], project["id"]))["registries"] == []

    live.patch(f"/docker/registries/{registry['id']}/", json={"password": "pw-2"})
    assert retained(broker, wire.release_topic(device["unit_id"], project["id"]))["registries"][0]["password"] == "pw-2"


# --- projects -----------------------------------------------------------------------------------------


def test_a_project_can_be_renamed_with_put_and_patch(live, project):
    assert live.put(f"/docker/projects/{project['id']}/", json={"name": "new", "description": "d"}).json()["name"] == "new"
    patched = live.patch(f"/docker/projects/{project['id']}/", json={"description": "only this"})
    assert patched.status_code == 200 and patched.json()["name"] == "new" and patched.json()["description"] == "only this"


def test_deleting_a_project_with_releases_needs_force_which_retracts_them(live, broker, project, device):
    create_release(live, project, [device])
    assert_error(live.delete(f"/docker/projects/{project['id']}/"), 409, "force")
    assert live.delete(f"/docker/projects/{project['id']}/?force=true").status_code == 204
    assert_error(live.get(f"/docker/projects/{project['id']}/"), 404)
    message = retained(broker, wire.release_topic(device["unit_id"], project["id"]))
    assert message["release"] is None and message["project_id"] == project["id"]


def test_an_empty_project_is_deleted_without_force(live, project):
    assert live.delete(f"/docker/projects/{project['id']}/").status_code == 204


# --- releases -----------------------------------------------------------------------------------------


def test_creating_a_release_publishes_it_retained_to_each_device(live, broker, project, device):
    release = create_release(live, project, [device])
    message = retained(broker, wire.release_topic(device["unit_id"], project["id"]))
    assert message["release"]["id"] == release["id"] and message["release"]["version_hash"] == release["version_hash"]


def test_a_release_is_retrieved_by_id_and_by_version_hash(live, project, device):
    release = create_release(live, project, [device])
    assert live.get(f"{releases_url(project)}{release['id']}/").json() == release
    assert live.get(f"{releases_url(project)}hash/{release['version_hash']}/").json() == release
    assert_error(live.get(f"{releases_url(project)}hash/00000000/"), 404)


def test_releases_are_filtered_by_version_and_device(live, project, device):
    other = live.post("/dongle/devices/", json={"name": "other"}).json()
    first = create_release(live, project, [device])
    body = release_payload([other["id"]], "app", "v2")
    body["version"] = "2.0.0"
    second = live.post(releases_url(project), json=body).json()
    assert [r["id"] for r in live.get(releases_url(project), params={"version": "2.0.0"}).json()["results"]] == [second["id"]]
    assert [r["id"] for r in live.get(releases_url(project), params={"device": device["id"]}).json()["results"]] == [first["id"]]
    assert live.get(releases_url(project), params={"version": "9"}).json()["count"] == 0


def test_updating_a_release_republishes_and_a_removed_device_gets_a_tombstone(live, broker, project, device):
    other = live.post("/dongle/devices/", json={"name": "other"}).json()
    release = create_release(live, project, [device, other])
    body = release_payload([device["id"]], "app", "v2")
    updated = live.put(f"{releases_url(project)}{release['id']}/", json=body)
    assert updated.status_code == 200, updated.text
    assert updated.json()["devices"] == [device["id"]] and updated.json()["version_hash"] != release["version_hash"]
    kept = retained(broker, wire.release_topic(device["unit_id"], project["id"]))
    assert kept["release"]["containers"][0]["tag"] == "v2"
    assert retained(broker, wire.release_topic(other["unit_id"], project["id"]))["release"] is None


def test_patching_a_release_changes_only_the_fields_given(live, project, device):
    release = create_release(live, project, [device])
    patched = live.patch(f"{releases_url(project)}{release['id']}/", json={"version": "1.0.1"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == "1.0.1" and patched.json()["containers"] == release["containers"]


def test_deleting_the_newest_release_falls_back_to_the_previous_one(live, broker, project, device):
    first = create_release(live, project, [device], tag="v1")
    second = create_release(live, project, [device], tag="v2")
    assert live.delete(f"{releases_url(project)}{second['id']}/").status_code == 204
    assert retained(broker, wire.release_topic(device["unit_id"], project["id"]))["release"]["id"] == first["id"]
    assert live.delete(f"{releases_url(project)}{first['id']}/").status_code == 204
    assert retained(broker, wire.release_topic(device["unit_id"], project["id"]))["release"] is None


def test_environment_is_accepted_as_an_object_and_returned_as_autopis_string(live, project, device):
    params = {"environment": {"GREETING": "hello world", "N": 3}, "binds": [], "network_mode": "host",
              "restart_policy": "on-failure:3", "privileged": False}
    release = create_release(live, project, [device], startup_parameters=params)
    assert release["containers"][0]["startup_parameters"]["environment"] == "GREETING='hello world' N=3"


@pytest.mark.parametrize("change, field", [
    (lambda b: b["containers"][0]["startup_parameters"].update(network_mode="mynet"), "containers"),
    (lambda b: b["containers"][0]["startup_parameters"].update(environment={"1BAD": "x"}), "containers"),
    (lambda b: b["containers"][0]["startup_parameters"].update(environment=["A=1"]), "containers"),
    (lambda b: b.update(remove_containers=["old", "old"]), "remove_containers"),
    (lambda b: b.update(remove_containers=["not a name"]), "remove_containers"),
    (lambda b: b["containers"].append(dict(b["containers"][0])), "containers"),
    (lambda b: b["containers"][0].update(image="Upper/Case"), "containers"),
])
def test_a_bad_release_over_http_gets_400_naming_the_field(live, project, device, change, field):
    body = release_payload([device["id"]], "app", "v1")
    change(body)
    assert_error(live.post(releases_url(project), json=body), 400, field)


def test_an_image_may_name_a_registry_host_and_path(live, project, device):
    release = live.post(releases_url(project), json=release_payload([device["id"]], "registry.example:5000/team/app", "v1"))
    assert release.status_code == 201, release.text


def test_a_device_listed_twice_is_rejected(live, project, device):
    assert_error(live.post(releases_url(project), json=release_payload([device["id"]] * 2, "app", "v1")), 400, "devices")


def test_remove_containers_may_not_name_another_projects_container_on_the_device(live, project, device):
    create_release(live, project, [device], name="db")
    other_project = live.post("/docker/projects/", json={"name": "other"}).json()
    body = release_payload([device["id"]], "app", "v1")
    body["remove_containers"] = [f"deployment-db-{project['id']}"]
    assert_error(live.post(releases_url(other_project), json=body), 400, "remove_containers")


# --- devices ------------------------------------------------------------------------------------------


def test_a_device_is_updated_and_listed_with_filters(live, device):
    updated = live.patch(f"/dongle/devices/{device['id']}/", json={"name": "renamed", "tags": ["a", "b"]})
    assert updated.status_code == 200 and updated.json()["tags"] == ["a", "b"]
    assert updated.json()["unit_id"] == device["unit_id"]
    assert_error(live.patch(f"/dongle/devices/{device['id']}/", json={"unit_id": str(uuid.uuid4())}), 400, "unit_id")
    live.post("/dongle/devices/", json={"name": "another"})
    by_name = live.get("/dongle/devices/", params={"name": "renamed"}).json()
    assert [d["id"] for d in by_name["results"]] == [device["id"]]
    by_unit = live.get("/dongle/devices/", params={"unit_id": device["unit_id"]}).json()
    assert by_unit["count"] == 1
    assert live.get("/dongle/devices/", params={"online": "true"}).json()["count"] == 0
    assert live.get("/dongle/devices/", params={"online": "false"}).json()["count"] == 2


def test_deleting_a_device_clears_its_retained_release_topics(live, broker, project, device):
    create_release(live, project, [device])
    assert retained(broker, wire.release_topic(device["unit_id"], project["id"])) is not None
    assert live.delete(f"/dongle/devices/{device['id']}/").status_code == 204
    assert retained(broker, wire.release_topic(device["unit_id"], project["id"])) is None
    assert_error(live.get(f"/dongle/devices/{device['id']}/"), 404)


# --- tokens and roles ---------------------------------------------------------------------------------


def test_a_token_value_is_shown_once_and_revoking_it_locks_it_out(live):
    created = live.post("/auth/tokens/", json={"name": "ci", "role": "operator", "expires": "2099-01-01T00:00:00Z"})
    assert created.status_code == 201, created.text
    token = created.json()
    assert token["token"].startswith("fleet_") and token["expires"].startswith("2099-01-01")
    listing = live.get("/auth/tokens/")
    assert token["token"] not in listing.text and "token" not in listing.json()["results"][-1]
    assert token["token"] not in live.get(f"/auth/tokens/{token['id']}/").text
    assert live.get("/docker/projects/", token=token["token"]).status_code == 200
    assert live.delete(f"/auth/tokens/{token['id']}/").status_code == 204
    assert_error(live.get("/docker/projects/", token=token["token"]), 401)


def test_a_viewer_reads_but_every_write_is_403(live, project):
    viewer = live.create_token("viewer")
    assert live.get("/docker/projects/", token=viewer).status_code == 200
    assert_error(live.post("/docker/projects/", json={"name": "x"}, token=viewer), 403)
    assert_error(live.delete(f"/docker/projects/{project['id']}/", token=viewer), 403)
    assert_error(live.get("/auth/tokens/", token=viewer), 403)


def test_an_operator_writes_resources_but_cannot_manage_tokens(live):
    operator = live.create_token("operator")
    assert live.post("/docker/projects/", json={"name": "x"}, token=operator).status_code == 201
    assert_error(live.post("/auth/tokens/", json={"name": "escalate", "role": "admin"}, token=operator), 403)


@pytest.mark.parametrize("body, field", [
    ({"name": "t", "role": "root"}, "role"),
    ({"name": "t", "expires": "2020-01-01T00:00:00Z"}, "expires"),
    ({"name": "t", "expires": "tomorrow"}, "expires"),
    ({"role": "admin"}, "name"),
])
def test_a_bad_token_request_gets_400_naming_the_field(live, body, field):
    assert_error(live.post("/auth/tokens/", json=body), 400, field)


# --- lists and errors ---------------------------------------------------------------------------------


def test_lists_page_with_limit_and_offset_in_a_stable_order(live):
    ids = [live.post("/docker/projects/", json={"name": f"p{i}"}).json()["id"] for i in range(5)]
    first = live.get("/docker/projects/", params={"limit": 2}).json()
    assert first["count"] == 5 and [p["id"] for p in first["results"]] == ids[:2] and first["previous"] is None
    second = live.request("GET", first["next"].removeprefix(live.url)).json()
    assert [p["id"] for p in second["results"]] == ids[2:4] and second["previous"]
    last = live.get("/docker/projects/", params={"limit": 2, "offset": 4}).json()
    assert [p["id"] for p in last["results"]] == ids[4:] and last["next"] is None
    assert_error(live.get("/docker/projects/", params={"limit": 0}), 400, "limit")


def test_every_error_has_the_one_shape(live):
    assert_error(live.get("/no/such/path/"), 404)
    assert_error(live.request("PUT", "/docker/projects/"), 405)
    assert_error(live.post("/docker/projects/", data="{", headers={"Content-Type": "application/json"}), 400)
    assert_error(live.post("/docker/projects/", json={"name": "x", "colour": "red"}), 400, "colour")
    assert_error(live.get("/docker/projects/", token="nope"), 401)


# --- concurrency --------------------------------------------------------------------------------------


def test_releases_created_at_once_leave_the_newest_committed_release_retained(live, broker, project, device):
    """Racing requests: the last publication for (device, project) must be the committed active release."""
    rounds, writers = 3, 6
    for round_number in range(rounds):
        barrier = threading.Barrier(writers)
        statuses = []

        def write(index):
            body = release_payload([device["id"]], "app", f"r{round_number}-{index}")
            barrier.wait(10)
            statuses.append(live.post(releases_url(project), json=body).status_code)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [201] * writers
        newest = live.get(releases_url(project), params={"device": device["id"], "limit": 1,
                                                         "offset": (round_number + 1) * writers - 1}).json()
        message = retained(broker, wire.release_topic(device["unit_id"], project["id"]))
        assert message["release"]["id"] == newest["results"][0]["id"], (round_number, message["release"]["id"])


def test_a_flush_that_computed_before_a_commit_never_publishes_after_it(live, broker, project, device):
    """Deterministic interleaving: A computes and publishes slowly; B commits a newer release meanwhile.

    Without the outbox lock A's stale document would land last.
    """
    from fleet_server.messaging import outbox
    from fleet_server.messaging.mqtt import publisher_for

    first = create_release(live, project, [device], tag="v1")
    with live.app.app_context():
        from fleet_server.extensions import db

        outbox.enqueue([device["unit_id"]], project["id"])
        db.session.commit()
    publisher = publisher_for(live.app)
    computed = threading.Event()

    def slow_publish(messages):
        computed.set()
        time.sleep(1.0)  # B commits and tries to flush while A still holds its document
        return [publisher.publish(topic, payload, retain=True) for topic, payload in messages]

    def flush_a():
        with live.app.app_context():
            outbox.flush(slow_publish)

    a = threading.Thread(target=flush_a)
    a.start()
    assert computed.wait(10)
    second = create_release(live, project, [device], tag="v2")  # B: commit, then flush
    a.join(30)
    assert second["id"] > first["id"]
    message = retained(broker, wire.release_topic(device["unit_id"], project["id"]))
    assert message["release"]["id"] == second["id"]
