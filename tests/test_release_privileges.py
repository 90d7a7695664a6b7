"""Privilege is an admin's decision: over real HTTP, on SQLite and PostgreSQL, an operator's release that
would give a container power over its devices gets 403 naming the field; the same release from an admin is created."""
import json
import subprocess
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import fleet_wire as wire
from fleet_device.deploy import DeployError, Deployer
from fleet_wire.release_policy import DATA_ROOT, LOCK_ROOT, ReleasePolicy
from fleet_server.app import create_app
from fleet_server.config import ConfigError
from tests.support.deploy import SERVE, message, owned_containers, release, spec, workload
from tests.support.infra import build_busybox_variant, free_port
from tests.support.stack import (
    Agent, LiveServer, Process, _answers, _command, eventually, make_app, release_payload, remove_agent_containers,
    running_stack, server_env,
)


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


# --- the agent applies the same policy from its own settings ---------------------------------------------


@pytest.fixture
def secured_stack(secured_broker, docker_client, tmp_path):
    """Server and worker with their own broker account on the secured broker, where devices register."""
    with running_stack(secured_broker.url, docker_client, tmp_path, extra_env=secured_broker.server_env(),
                       web_workers=1) as running:
        yield running


def registered_agent(stack, state_dir: Path, *extra) -> tuple[dict, str]:
    """A device registered with a provisioning token and its agent running: (identity, local API URL)."""
    token = stack.post("/dongle/provisioning-tokens/", json={"name": "test"}).json()["token"]
    registered = subprocess.run(
        _command("fleet-device") + ["register", "--server", stack.url, "--token", token, "--state-dir", str(state_dir),
                                    "--hardware-id", f"hw-{uuid.uuid4().hex[:12]}"],
        capture_output=True, text=True, timeout=60, env=stack.env)
    assert registered.returncode == 0, registered.stderr
    identity = json.loads((state_dir / "identity.json").read_text())
    port = free_port()
    process = Process(
        _command("fleet-device") + ["run", "--state-dir", str(state_dir), "--api", f"127.0.0.1:{port}",
                                    "--minion-id-file", str(state_dir / "minion_id"), "--settle", "1", *extra],
        {**stack.env, "FLEET_LOG_LEVEL": "DEBUG"}, state_dir.parent / f"{state_dir.name}.log").start()
    stack.processes.append(process)
    stack.agents.append(Agent(identity["unit_id"], state_dir, f"http://127.0.0.1:{port}", process))
    eventually(lambda: _answers(f"http://127.0.0.1:{port}/"), 20, message="the agent's local API")
    return identity, f"http://127.0.0.1:{port}"


def publish_retained(broker, account: tuple[str, str], topic: str, payload: bytes):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-test-forger-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(*account)
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def forged_privileged(release: dict) -> dict:
    """The device's document of `release`, with its first container made privileged."""
    containers = [{key: c[key] for key in ("name", "image", "tag", "required_tags", "purge_data", "registry",
                                            "fully_qualified_name")}
                  | {"startup_parameters": {**c["startup_parameters"], "privileged": True}}
                  for c in release["containers"]]
    return {"id": release["id"], "version": release["version"], "version_hash": release["version_hash"],
            "remove_containers": [], "containers": containers}


def test_an_agent_refuses_a_privileged_release_forged_on_the_broker_with_the_servers_account(
        secured_broker, secured_stack, docker_client, unique_name, tmp_path):
    identity, api = registered_agent(secured_stack, tmp_path / "device")
    image = unique_name.image("forged", tag="v1")
    build_busybox_variant(docker_client, image, cmd=["sleep", "3600"])
    project = secured_stack.post("/docker/projects/", json={"name": "forged"}).json()
    created = secured_stack.post(f"/docker/projects/{project['id']}/releases/", json=release_payload(
        [identity["device_id"]], *image.rsplit(":", 1), name=f"f{uuid.uuid4().hex[:8]}"))
    assert created.status_code == 201, created.text
    release = created.json()
    queued = tmp_path / "device" / "projects" / str(project["id"]) / "queued.json"
    eventually(queued.exists, 30, message="the release to reach the agent")

    # Whoever holds the server's broker account can publish any release; the device judges it by its own settings.
    document = forged_privileged(release)
    publish_retained(secured_broker, secured_broker.server, wire.release_topic(identity["unit_id"], project["id"]),
                     wire.encode(wire.from_builtins(wire.ReleaseMessage, {"project_id": project["id"], "release": document,
                                                        "registries": []})))
    eventually(lambda: json.loads(queued.read_text())["release"] == document, 30,
               message="the forged release in the agent's queue")

    slept = subprocess.run(_command("fleet-device") + ["sleep", "--api", api.removeprefix("http://")],
                           capture_output=True, text=True, timeout=120)
    outcome = json.loads(slept.stdout)["return"][0]
    field = "containers.0.startup_parameters.privileged"
    assert outcome["state"] == "failed" and outcome["step"] == "policy" and field in outcome["detail"], outcome
    assert docker_client.containers.list(all=True, filters={"label": f"fleet.unit_id={identity['unit_id']}"}) == []
    assert not docker_client.containers.list(all=True, filters={"name": document["containers"][0]["fully_qualified_name"]})

    def reported():
        deployments = secured_stack.get(f"/docker/projects/{project['id']}/releases/{release['id']}/deployments/").json()
        rows = deployments["results"] if isinstance(deployments, dict) else deployments
        return rows and rows[0]["state"] == "failed" and field in rows[0]["detail"] and rows[0]
    eventually(reported, 30, message="the server to record the refusal")


@pytest.fixture
def strict_deployer(docker_client, tmp_path):
    """A deploy engine on the real engine with a device's default trust, but its data root in the test's directory."""
    unit_id = str(uuid.uuid4())
    engine = Deployer(unit_id, tmp_path / "state", client=docker_client, settle_seconds=0.3, stop_timeout=2,
                      policy=ReleasePolicy(bind_roots=(str(tmp_path / "data"),)))
    yield engine
    remove_agent_containers(docker_client, [unit_id])


def test_a_device_refuses_a_bind_that_a_link_inside_its_data_root_leads_out_of(strict_deployer, docker_client,
                                                                                 unique_name, tmp_path):
    (tmp_path / "data" / "app").mkdir(parents=True)
    (tmp_path / "data" / "escape").symlink_to("/etc")  # as a container binding the data root could leave it
    image = workload(docker_client, unique_name, "strict")
    name = unique_name("strict")
    inside = spec(name, image)
    inside["startup_parameters"]["binds"] = [f"{tmp_path}/data//app/:/data"]
    strict_deployer.apply(7, release(1, inside), {}, context=message(7, release(1, inside)))
    strict_deployer.forget(7)
    assert docker_client.containers.get(name).status == "running"

    escaping = spec(name, image)
    escaping["startup_parameters"]["binds"] = [f"{tmp_path}/data/app:/data", f"{tmp_path}/data/escape/ssl:/ssl"]
    with pytest.raises(DeployError) as refused:
        strict_deployer.apply(7, release(2, escaping), {}, previous=release(1, inside))
    assert refused.value.step == "policy" and "containers.0.startup_parameters.binds.1" in refused.value.reason
    assert docker_client.containers.get(name).labels["fleet.release"] == "1"  # nothing was touched


def test_a_device_refuses_to_remove_a_container_fleet_does_not_manage_and_leaves_it_running(
        strict_deployer, docker_client, unique_name, busybox_image):
    legacy = unique_name("legacy")
    docker_client.containers.run(busybox_image, SERVE, name=legacy, detach=True, network_mode="none")
    try:
        doc = release(1, spec(unique_name("app"), workload(docker_client, unique_name, "app")),
                      remove_containers=[legacy, "absent-anyway"])
        with pytest.raises(DeployError) as refused:
            strict_deployer.apply(8, doc, {})
        assert refused.value.step == "policy" and "remove_containers.0" in refused.value.reason
        assert "remove_containers.1" not in refused.value.reason  # nothing by that name: nothing to remove
        assert docker_client.containers.get(legacy).status == "running"
        assert owned_containers(docker_client, strict_deployer.unit_id) == {}
    finally:
        docker_client.containers.get(legacy).remove(force=True)


@pytest.mark.parametrize("setting, value, named", [
    ("FLEET_DEVICE_ALLOWED_BIND_ROOTS", "data", "'data' is not an absolute path"),
    ("FLEET_DEVICE_ALLOWED_BIND_ROOTS", "/var/lib/fleet-device/data:/var/run/docker.sock", "engine socket"),
    ("FLEET_DEVICE_ALLOW_PRIVILEGED", "maybe", "'maybe': expected 1 or 0"),
])
def test_a_bad_device_setting_stops_the_agent_with_one_line_naming_it(tmp_path, setting, value, named):
    result = subprocess.run(_command("fleet-device") + ["run", "--state-dir", str(tmp_path)],
                            env={**server_env(tmp_path, "mqtt://127.0.0.1:1"), setting: value},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert named in result.stderr.splitlines()[-1], result.stderr
