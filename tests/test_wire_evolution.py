"""The wire grows without breaking: both sides ignore fields they do not know, an unknown deployment state is
recorded as sent, and devices registered under older broker rules follow every new topic after a restart."""
from __future__ import annotations

import json
import time
import uuid

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import fleet_wire as wire
from fleet_server import broker_accounts
from tests.support.stack import eventually, release_payload, running_stack

NEWER = {"added_by_a_newer_version": {"any": ["shape"]}}


def _release_message() -> dict:
    container = {"name": "app", "image": "busybox", "tag": "1", "required_tags": [], "purge_data": False,
                 "registry": None, "fully_qualified_name": "deployment-app-1",
                 "startup_parameters": {"environment": "", "binds": [], "network_mode": "none",
                                        "restart_policy": "no", "privileged": False, **NEWER}, **NEWER}
    return {"v": 1, "seq": 9, "project_id": 1, "registries": [{"id": 1, "url": "registry.example:5000", **NEWER}],
            "release": {"id": 1, "version": "1", "version_hash": "0badc0de", "containers": [container],
                        "remove_containers": [], **NEWER}, **NEWER}


def test_the_agent_ignores_fields_it_does_not_know_at_every_level_of_a_release_document():
    loaded = wire.decode(wire.ReleaseMessage, json.dumps(_release_message()).encode())
    container = loaded.release.containers[0]
    assert container.startup_parameters.network_mode == "none"
    assert "added_by_a_newer_version" not in msgspec.to_builtins(loaded)
    assert loaded.seq == 9 and loaded.registries[0].url == "registry.example:5000"


@pytest.mark.parametrize("kind, body", [
    (wire.DeploymentReport, {"project_id": 1, "release_id": 2, "state": "queued", "ts": 1.0}),
    (wire.Status, {"state": "online"}),
    (wire.CommandResult, {"id": str(uuid.uuid4()), "state": "succeeded", "return": 1, "error": None,
                           "truncated": False, "started_at": None, "finished_at": None, "ts": 1.0}),
    (wire.CommandMessage, {"id": str(uuid.uuid4()), "command": "test.ping", "arg": [], "kwarg": {},
                            "timeout": None, "deadline": 2e9}),
    (wire.TelemetryBatch, {"batch_id": uuid.uuid4().hex, "dropped": 0,
                            "readings": [{"field": "t", "type": "float", "ts": 1.0, "value": 2.0, **NEWER}]}),
    (wire.ReleaseSeqMarker, {"seq": 3}),
])
def test_every_wire_message_is_read_with_fields_it_does_not_know(kind, body):
    loaded = wire.decode(kind, json.dumps({"v": 1, **body, **NEWER}).encode())
    assert "added_by_a_newer_version" not in msgspec.to_builtins(loaded)
    if kind is wire.TelemetryBatch:
        assert loaded.readings == [wire.Reading(field="t", type="float", ts=1.0, value=2.0)]


def test_a_release_document_of_an_older_server_without_seq_is_read():
    document = _release_message()
    del document["seq"]
    assert wire.decode(wire.ReleaseMessage, json.dumps(document).encode()).seq is None


@pytest.mark.parametrize("state, accepted", [
    ("succeeded", True), ("waiting_for_power", True),
    ("superseded", False), ("pending", False), ("Bad State", False), ("x" * 21, False), ("", False),
])
def test_a_deployment_state_is_a_known_one_or_a_newer_agents_word_but_never_the_servers_own(state, accepted):
    payload = json.dumps({"v": 1, "project_id": 1, "release_id": 2, "state": state, "ts": 1.0}).encode()
    if accepted:
        assert wire.decode(wire.DeploymentReport, payload).state == state
    else:
        with pytest.raises(wire.WireError, match="state"):
            wire.decode(wire.DeploymentReport, payload)


def test_an_unknown_deployment_state_and_unknown_fields_are_recorded_as_the_agent_sent_them(app, client, auth):
    from fleet_server.messaging import ingest
    from fleet_server.extensions import db
    from fleet_server.models import Deployment

    device = client.post("/dongle/devices/", json={"name": "newer"}, headers=auth).get_json()
    project = client.post("/docker/projects/", json={"name": "p"}, headers=auth).get_json()
    release = client.post(f"/docker/projects/{project['id']}/releases/",
                          json=release_payload([device["id"]], "app", "v1"), headers=auth).get_json()
    body = {"v": 1, "project_id": project["id"], "release_id": release["id"], "version_hash": release["version_hash"],
            "state": "waiting_for_power", "step": None, "detail": "", "ts": time.time(), **NEWER}
    with app.app_context():
        assert ingest.handle_message(wire.device_topic(device["unit_id"], "deployments"), json.dumps(body).encode())
        assert db.session.scalar(db.select(Deployment.state)) == "waiting_for_power"
        db.session.remove()
    shown = client.get(f"/docker/projects/{project['id']}/releases/{release['id']}/", headers=auth).get_json()
    assert shown["successful_deployments"] == []


# --- broker rules of devices registered earlier ------------------------------------------------------------------

def _subscribes(broker, username, password, topic) -> bool:
    """Whether the broker grants this account a subscription to `topic`."""
    return _as_device(broker, username, password, lambda client: client.subscribe(topic, qos=1), "suback")


def _publishes(broker, username, password, topic) -> bool:
    """Whether the broker accepts this account's QoS 1 publication on `topic`."""
    return _as_device(broker, username, password, lambda client: client.publish(topic, b'{"v": 1, "seq": 0}', qos=1),
                      "puback")


def _as_device(broker, username, password, act, answer) -> bool:
    answers = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=broker_accounts.device_client_id(username),
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.on_connect = lambda c, u, flags, rc, p: answers.setdefault("connack", rc)
    client.on_subscribe = lambda c, u, mid, codes, p: answers.setdefault("suback", codes)
    client.on_publish = lambda c, u, mid, code, p: answers.setdefault("puback", [code])
    client.connect(broker.host, broker.port, keepalive=10)
    client.loop_start()
    try:
        eventually(lambda: "connack" in answers, 10, 0.02, "a CONNACK")
        assert not answers["connack"].is_failure, answers["connack"]
        act(client)
        return not eventually(lambda: answers.get(answer), 10, 0.02, f"a {answer.upper()}")[0].is_failure
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.slow
def test_a_device_registered_under_older_broker_rules_gets_the_new_topics_when_the_worker_starts(
        secured_broker, docker_client, tmp_path):
    with running_stack(secured_broker.url, docker_client, tmp_path, extra_env=secured_broker.server_env(),
                       web_workers=1) as stack:
        device = stack.create_device("registered-long-ago")
        unit_id, password = device["unit_id"], uuid.uuid4().hex
        commands = wire.device_topic(unit_id, "commands")
        control = secured_broker.control()
        try:
            control.run({"command": "createClient", "username": unit_id, "password": password,
                         "clientid": broker_accounts.device_client_id(unit_id),
                         "roles": [{"rolename": broker_accounts.device_role(unit_id)}]})
            # The rules of a release without commands: the role lacks that topic.
            control.run({"command": "removeRoleACL", "rolename": broker_accounts.device_role(unit_id),
                         "acltype": "subscribePattern", "topic": commands})
            # And a server role from before the release seq marker.
            control.run(*({"command": "removeRoleACL", "rolename": broker_accounts.SERVER_ROLE,
                           "acltype": acltype, "topic": wire.RELEASE_SEQ_MARKER_TOPIC}
                          for acltype in ("publishClientSend", "subscribePattern")))
            assert not _subscribes(secured_broker, unit_id, password, commands)

            worker_id = stack.worker.args[stack.worker.args.index("--worker-id") + 1]
            stack.worker.stop()
            stack.worker = stack.start_worker(worker_id)

            eventually(lambda: _subscribes(secured_broker, unit_id, password, commands), 30,
                       message="the device's role to gain the commands topic" + stack.logs())
            assert _subscribes(secured_broker, unit_id, password, wire.release_subscription(unit_id))
            assert not _subscribes(secured_broker, unit_id, password, wire.RELEASE_SEQ_MARKER_TOPIC)
            assert not _publishes(secured_broker, unit_id, password, wire.RELEASE_SEQ_MARKER_TOPIC)
            assert _publishes(secured_broker, unit_id, password, wire.device_topic(unit_id, "status"))
            eventually(lambda: "broker roles up to date: 1 of 1 device role(s) changed" in stack.worker.log(), 30,
                       message="the worker to say what it changed")
            roles = broker_accounts._roles_acls(control)
            assert ("subscribePattern", wire.RELEASE_SEQ_MARKER_TOPIC, True) in roles[broker_accounts.SERVER_ROLE]
        finally:
            control.run({"command": "deleteClient", "username": unit_id}, ignore=("not found",))
            control.close()
