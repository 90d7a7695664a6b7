"""Deployment progress on the server: reports go through the real ingest path and show per release and per device."""
import time

import pytest

import fleet_wire as wire
from fleet_server.messaging.ingest import handle_message
from tests.support.stack import release_payload


@pytest.fixture
def fleet(app, client, auth):
    """A project, two devices and two releases of the project targeting them."""
    def post(path, body):
        response = client.post(path, json=body, headers=auth)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    project = post("/docker/projects/", {"name": "demo"})
    devices = [post("/dongle/devices/", {"name": f"dongle-{i}"}) for i in range(2)]
    ids = [d["id"] for d in devices]
    releases = [post(f"/docker/projects/{project['id']}/releases/", release_payload(ids, "acme/app", tag))
                for tag in ("v1", "v2")]
    return {"project": project, "devices": devices, "releases": releases}


def report(app, device, release, state, step=None, detail="", ts=None):
    body = {"project_id": release["project"], "release_id": release["id"], "version_hash": release["version_hash"],
            "state": state, "step": step, "detail": detail, "ts": ts or time.time()}
    with app.app_context():
        assert handle_message(wire.device_topic(device["unit_id"], "deployments"),
                              wire.encode(wire.from_builtins(wire.DeploymentReport, body)))


def release_view(client, auth, fleet, index):
    path = f"/docker/projects/{fleet['project']['id']}/releases/{fleet['releases'][index]['id']}/deployments/"
    response = client.get(path, headers=auth)
    assert response.status_code == 200, response.get_json()
    return {row["device"]: row for row in response.get_json()["results"]}


def test_every_targeted_device_is_listed_as_pending_before_it_reports(client, auth, fleet):
    rows = release_view(client, auth, fleet, 0)
    assert sorted(rows) == sorted(d["id"] for d in fleet["devices"])
    assert {row["state"] for row in rows.values()} == {"pending"}


def test_a_failure_shows_its_step_and_reason_per_release_and_per_device(app, client, auth, fleet):
    first, second = fleet["devices"]
    release = fleet["releases"][0]
    report(app, first, release, "verifying", "verify")
    report(app, second, release, "failed", "pull", "cannot pull acme/app:v1: manifest unknown")

    rows = release_view(client, auth, fleet, 0)
    assert (rows[first["id"]]["state"], rows[first["id"]]["step"]) == ("verifying", "verify")
    failed = rows[second["id"]]
    assert (failed["state"], failed["step"], failed["detail"]) == ("failed", "pull",
                                                                   "cannot pull acme/app:v1: manifest unknown")
    assert failed["unit_id"] == second["unit_id"] and failed["reported_at"] and failed["updated_at"]

    response = client.get(f"/dongle/devices/{second['id']}/deployments/", headers=auth)
    assert response.status_code == 200
    by_release = [(r["release"], r["state"]) for r in response.get_json()["results"]]
    assert by_release == [(fleet["releases"][1]["id"], "pending"), (release["id"], "failed")]


def test_a_newer_release_that_succeeds_supersedes_the_older_one_on_that_device(app, client, auth, fleet):
    device = fleet["devices"][0]
    report(app, device, fleet["releases"][0], "succeeded", "verify")
    report(app, device, fleet["releases"][1], "succeeded", "verify")

    assert release_view(client, auth, fleet, 0)[device["id"]]["state"] == "superseded"
    assert release_view(client, auth, fleet, 1)[device["id"]]["state"] == "succeeded"


def test_an_older_report_arriving_late_does_not_overwrite_a_newer_one(app, client, auth, fleet):
    device, release = fleet["devices"][0], fleet["releases"][0]
    now = time.time()
    report(app, device, release, "rolled_back", "verify", "the agent stopped during verify", ts=now)
    report(app, device, release, "starting", "start", ts=now - 5)
    assert release_view(client, auth, fleet, 0)[device["id"]]["state"] == "rolled_back"


def test_unknown_releases_and_devices_are_404_and_a_missing_token_is_401(client, auth, fleet):
    project_id = fleet["project"]["id"]
    assert client.get(f"/docker/projects/{project_id}/releases/999/deployments/", headers=auth).status_code == 404
    assert client.get(f"/docker/projects/{project_id + 1}/releases/{fleet['releases'][0]['id']}/deployments/",
                      headers=auth).status_code == 404
    missing = client.get("/dongle/devices/00000000-0000-0000-0000-000000000000/deployments/", headers=auth)
    assert missing.status_code == 404 and "does not exist" in missing.get_json()["message"]
    assert client.get(f"/dongle/devices/{fleet['devices'][0]['id']}/deployments/").status_code == 401
    bad = client.get(f"/dongle/devices/{fleet['devices'][0]['id']}/deployments/?limit=0", headers=auth)
    assert bad.status_code == 400 and "limit" in bad.get_json()["errors"]


def test_deployment_pages_are_limited_and_link_to_the_next(client, auth, fleet):
    path = f"/docker/projects/{fleet['project']['id']}/releases/{fleet['releases'][0]['id']}/deployments/?limit=1"
    page = client.get(path, headers=auth).get_json()
    assert page["count"] == 2 and len(page["results"]) == 1 and "offset=1" in page["next"]


@pytest.mark.slow
def test_a_failed_deploy_on_a_real_device_shows_its_reason_on_the_server(stack, docker_client, unique_name):
    from tests.support.deploy import workload
    from tests.support.stack import eventually

    device = stack.create_device("dongle")
    agent = stack.start_agent(device, settle=0.5)
    project = stack.post("/docker/projects/", json={"name": unique_name("project")}).json()
    broken = workload(docker_client, unique_name, "broken", cmd=["sh", "-c", "echo missing config; exit 2"])
    body = release_payload([device["id"]], *broken.rsplit(":", 1), name=unique_name("svc"))
    release = stack.post(f"/docker/projects/{project['id']}/releases/", json=body).json()
    path = f"/docker/projects/{project['id']}/releases/{release['id']}/deployments/"
    eventually(lambda: stack.get(path).json()["results"][0]["state"] == "queued", 20, message="the queued report")

    assert agent.sleep().returncode == 0

    row = eventually(lambda: [r for r in stack.get(path).json()["results"] if r["state"] == "failed"], 20,
                     message="the failed report on the server")[0]
    assert row["step"] == "verify" and "exit code 2" in row["detail"] and "missing config" in row["detail"]
    mine = stack.get(f"/dongle/devices/{device['id']}/deployments/").json()["results"]
    assert [(r["release"], r["state"]) for r in mine] == [(release["id"], "failed")]
