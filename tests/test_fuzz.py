"""10,000 hostile MQTT payloads at the agent's and the worker's topics: both keep serving, nothing is written.

The agent hears releases and commands; the worker every kind of report, command results included.
"""
from __future__ import annotations

import json
import math
import random
import time
import uuid

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

import fleet_wire as wire
from fleet_server.messaging import ingest
from tests.support.infra import build_busybox_variant
from tests.support.stack import eventually, release_payload

pytestmark = pytest.mark.slow

AGENT_MESSAGES = int(__import__("os").environ.get("FUZZ_N", 5000))
WORKER_MESSAGES = AGENT_MESSAGES
SEED = 20261125

VALID = {
    "releases": {"v": 1, "project_id": 1, "release": {
        "id": 1, "version": "1", "version_hash": "0123abcd", "remove_containers": [],
        "containers": [{"name": "a", "image": "i", "tag": "t", "fully_qualified_name": "deployment-a-1"}]},
        "registries": []},
    "deployments": {"v": 1, "project_id": 1, "release_id": 1, "state": "succeeded", "ts": 1.0},
    "status": {"v": 1, "state": "online", "agent_version": "1", "ts": 1.0},
    "commands": {"v": 1, "id": "6d1f0c4e-3b7a-4f7e-9a52-2f4cbbd0c0de", "command": "docker.stop", "arg": ["web"],
                 "kwarg": {}, "timeout": None, "deadline": 4e9},
    "results": {"v": 1, "id": "6d1f0c4e-3b7a-4f7e-9a52-2f4cbbd0c0de", "state": "succeeded", "return": True,
                "error": None, "ts": 1.0},
    "telemetry": {"v": 1, "batch_id": "0123456789abcdef0123456789abcdef", "dropped": 0,
                  "readings": [{"field": "obd.bat.voltage", "type": "float", "ts": 1.0, "value": 12.6}]},
}
KINDS = {"releases": wire.ReleaseMessage, "deployments": wire.DeploymentReport, "status": wire.Status,
         "commands": wire.CommandMessage, "results": wire.CommandResult, "telemetry": wire.TelemetryBatch}
ODD_VALUES = [None, True, -1, 2**63, 1e308, "", "x" * 5000, [], {}, [None], {"$gt": ""}, "../../etc/passwd",
              "\u0000", "\ud800", "<script>", -0.0, "NaN"]


def _mutate(document, rng, depth=0):
    """Replace, drop or retype one field somewhere in the document."""
    if not isinstance(document, dict) or not document or depth > 4:
        return rng.choice(ODD_VALUES)
    document = dict(document)
    key = rng.choice(list(document))
    action = rng.random()
    if action < 0.3:
        del document[key]
    elif action < 0.6 and isinstance(document[key], dict):
        document[key] = _mutate(document[key], rng, depth + 1)
    elif action < 0.7 and isinstance(document[key], list) and document[key]:
        document[key] = [_mutate(document[key][0], rng, depth + 1)]
    else:
        document[key] = rng.choice(ODD_VALUES)
    if rng.random() < 0.3:
        document[f"unknown_{rng.randrange(100)}"] = rng.choice(ODD_VALUES)
    return document


UNSTORABLE_VALUES = ["\ud800", "ok\udfff", "a\u0000b", math.nan, math.inf, -math.inf, 2 ** 63, -2 ** 63 - 1,
                     10 ** 30, json.loads("[" * 40 + "]" * 40)]


def _with_unstorable_value(document, rng):
    """The document with one value, somewhere inside it, that json.loads accepts but no database stores."""
    document = dict(document)
    key = rng.choice(list(document))
    if isinstance(document[key], dict) and document[key] and rng.random() < 0.5:
        document[key] = _with_unstorable_value(document[key], rng)
    elif isinstance(document[key], list) and document[key] and isinstance(document[key][0], dict):
        document[key] = [_with_unstorable_value(document[key][0], rng)]
    else:
        document[key] = rng.choice(UNSTORABLE_VALUES)
    return document


def hostile_payloads(kind: str, count: int, rng: random.Random):
    """`count` payloads of every hostile sort, none of which the wire contract accepts."""
    message_kind = KINDS[kind]
    valid = VALID[kind]
    makers = [
        lambda: rng.randbytes(rng.randrange(1, 300)),  # binary (an empty payload clears a topic: not hostile)
        lambda: json.dumps(valid).encode()[: rng.randrange(1, 60)],                       # truncated JSON
        lambda: json.dumps(rng.choice([[], 1, "s", None, True, [valid]])).encode(),       # not an object
        lambda: json.dumps({**valid, "v": rng.choice([0, 2, "1", 1.5, None, [], 10**30])}).encode(),  # protocol version
        lambda: json.dumps({k: v for k, v in valid.items() if k == "v"} | {"extra": rng.random()}).encode(),
        lambda: json.dumps(_mutate(_mutate(valid, rng), rng)).encode(),                   # wrong types, unknown fields
        lambda: rng.choice(["[", "{\"a\":"]).encode() * rng.randrange(1000, 60000),      # deeply nested
        lambda: b'{"v": 1, "ts": NaN, "state": "online", "project_id": Infinity}',
        lambda: b'{"v": 1, "project_id": ' + b"9" * 5000 + b"}",                         # a number too long to parse
        lambda: b'{"v": 1, "state": "\xff\xfe"}',                                        # invalid UTF-8
        lambda: json.dumps(_with_unstorable_value(valid, rng)).encode(),                   # unstorable value
    ]
    payloads = []
    while len(payloads) < count:
        payload = rng.choice(makers)()
        try:
            wire.decode(message_kind, payload)
        except wire.WireError:
            payloads.append(payload)
    # A few huge ones: over the size limit, and just under it with garbage inside.
    payloads[:3] = [b"{" + b" " * (wire.MAX_PAYLOAD_BYTES + 10) + b"}", b'{"v": 1, "x": "' + b"a" * 900_000 + b'"}',
                    b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1)]
    return payloads


def _publish_all(broker, messages, budget=120):
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-test-fuzz-{uuid.uuid4().hex[:6]}",
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + budget
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert all(info.is_published() for info in infos), "the broker did not take every message"
    finally:
        client.disconnect()
        client.loop_stop()


def _agent_status(agent):
    return requests.get(agent.api_url + "/status", timeout=5).json()


def test_hostile_payloads_are_rejected_counted_and_logged_and_both_sides_keep_serving(
    stack, broker, docker_client, unique_name
):
    device = stack.create_device("fuzzed agent")
    bystander = stack.create_device("fuzzed reports")  # no agent: only the worker hears its topics
    agent = stack.start_agent(device)
    eventually(lambda: _agent_status(agent)["connected"], 20, message="the agent to connect")
    project = stack.post("/docker/projects/", json={"name": "fuzz"}).json()
    rng = random.Random(SEED)

    # The agent hears releases and commands; the worker every kind of report.
    commands_share = AGENT_MESSAGES // 2
    messages = [(wire.release_topic(device["unit_id"], project["id"]), p)
                for p in hostile_payloads("releases", AGENT_MESSAGES - commands_share, rng)]
    messages += [(wire.device_topic(device["unit_id"], "commands"), p)
                 for p in hostile_payloads("commands", commands_share, rng)]
    report_kinds = [kind for kind in ingest.KINDS if kind in VALID]
    for index, kind in enumerate(report_kinds):
        share = WORKER_MESSAGES // len(report_kinds) + (index < WORKER_MESSAGES % len(report_kinds))
        messages += [(wire.device_topic(bystander["unit_id"], kind), p) for p in hostile_payloads(kind, share, rng)]
    rng.shuffle(messages)
    assert len(messages) == AGENT_MESSAGES + WORKER_MESSAGES
    started = time.monotonic()
    _publish_all(broker, messages)

    eventually(lambda: _agent_status(agent)["messages"]["rejected"] >= AGENT_MESSAGES, 180, 0.5,
               message="the agent to reject every hostile release message")
    # The worker acknowledges every hostile report and keeps it as a dead letter; its log is not flooded.
    dead_letters = lambda: stack.get("/ingest/dead-letters/", params={  # noqa: E731
        "unit_id": bystander["unit_id"], "limit": 1}).json()["count"]
    eventually(lambda: dead_letters() >= WORKER_MESSAGES, 180, 0.5,
               message="the worker to keep every hostile report as a dead letter")
    worker_log = "".join(p.log() for p in stack.processes if "worker" in p.log_path.name)
    assert worker_log.count("kept as a dead letter") < WORKER_MESSAGES // 10
    elapsed = time.monotonic() - started
    assert dead_letters() == WORKER_MESSAGES
    assert _agent_status(agent)["messages"]["rejected"] == AGENT_MESSAGES
    assert agent.process.log().count("rejected message topic=") == AGENT_MESSAGES

    # Nothing was written from a rejected message: no release queued, no command journaled or
    # run, no report, reading or command result stored for the device the reports named.
    assert not (agent.state_dir / "projects" / str(project["id"])).exists()
    journal = agent.state_dir / "commands" / "journal.log"
    assert not journal.exists() or journal.read_bytes() == b""
    readings = stack.get("/logbook/storage/read/", params={
        "device_id": bystander["id"], "field": "obd.bat.voltage", "field_type": "float",
        "from_utc": "1970-01-01T00:00:00Z", "to_utc": "2100-01-01T00:00:00Z"})
    assert readings.status_code == 200 and readings.json() == []
    untouched = stack.get(f"/dongle/devices/{bystander['id']}/").json()
    assert (untouched["online"], untouched["last_seen_at"], untouched["agent_version"], untouched["docker_releases"]) == (
        False, None, None, [])

    # Both keep serving: a real command and a real release with its report go through.
    ping = requests.post(f"{agent.api_url}/dongle/{device['unit_id']}/execute/",
                         json={"command": "test.ping", "arg": [], "kwarg": {}}, timeout=10).json()
    assert (ping["state"], ping["return"], ping["error"]) == ("succeeded", True, None)
    image = unique_name.image("fuzz", tag="v1")
    build_busybox_variant(docker_client, image, cmd=["sleep", "3600"])
    created = stack.post(f"/docker/projects/{project['id']}/releases/",
                         json=release_payload([device["id"]], *image.rsplit(":", 1), name=f"f{uuid.uuid4().hex[:8]}"))
    assert created.status_code == 201, created.text
    eventually(lambda: (agent.state_dir / "projects" / str(project["id"]) / "queued.json").exists(), 30,
               message="the real release to be queued after the storm")
    assert json.loads(agent.sleep().stdout)["return"][0]["state"] == "succeeded"
    eventually(lambda: stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [created.json()["id"]],
               30, message="the worker to record the real report")
    assert agent.process.popen.poll() is None
    print(f"\n{len(messages)} hostile messages rejected by agent and worker in {elapsed:.1f} s")
