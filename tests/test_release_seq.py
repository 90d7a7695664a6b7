"""Releases never go backwards: every release document carries a seq that only grows, the agent ignores older
ones, and a broker that lost retained messages (a crash inside its autosave interval) is given them all again."""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from flask.cli import ScriptInfo

import fleet_wire as wire
from fleet_device.state import ReleaseQueue
from tests.support.infra import LOOPBACK, build_busybox_variant, close_mqtt, connect_mqtt, free_port, \
    subscribe_and_wait, wait_for_mqtt
from tests.support.stack import eventually, release_payload, running_stack


def _doc(project_id, release_id, seq=None, version_hash="0badc0de"):
    release = None if release_id is None else {
        "id": release_id, "version": str(release_id), "version_hash": version_hash, "containers": [],
        "remove_containers": []}
    body = {"project_id": project_id, "release": release, "registries": []}
    if seq is not None:
        body["seq"] = seq
    # The agent keeps a release as plain values (see Agent._handle_release).
    return msgspec.to_builtins(wire.decode(wire.ReleaseMessage, wire.encode(wire.from_builtins(wire.ReleaseMessage, body))))


# --- the agent's side ---------------------------------------------------------------------------------------------

def test_the_queue_refuses_a_lower_seq_accepts_an_equal_one_and_remembers_the_highest_across_restarts(tmp_path):
    queue = ReleaseQueue(tmp_path)
    assert queue.highest_seq(7) is None
    assert queue.accept_seq(7, 5)
    assert queue.accept_seq(7, 5)  # the same document again (a redelivery): handled as before
    assert not queue.accept_seq(7, 4)
    assert queue.accept_seq(8, 1)  # each project on its own
    assert queue.accept_seq(7, None)  # a server older than seq: accepted as always
    assert ReleaseQueue(tmp_path).highest_seq(7) == 5
    assert not ReleaseQueue(tmp_path).accept_seq(7, 3)
    assert ReleaseQueue(tmp_path).accept_seq(7, 6) and queue.highest_seq(7) == 6


class _NoEngine:
    """The agent's deployer, never called by what these tests do."""


@pytest.fixture
def agent(tmp_path):
    from fleet_device.agent import Agent, AgentConfig

    made = Agent(AgentConfig(unit_id=str(uuid.uuid4()), state_dir=tmp_path / "state", minion_id_file=None),
                 deployer=_NoEngine())
    yield made
    made.command_runner.stop()


def test_the_agent_ignores_an_older_release_document_and_logs_it_once(agent, caplog):
    agent._receive_release(3, _doc(3, 20, seq=12))
    caplog.set_level(logging.WARNING, logger="fleet_device.agent")
    for _ in range(3):  # a broker replays a retained document at every reconnection
        agent._receive_release(3, _doc(3, 10, seq=11, version_hash="1badc0de"))
    assert agent.queue.queued(3)["release"]["id"] == 20
    assert len([r for r in caplog.records if "ignored an older release document" in r.getMessage()]) == 1


def test_the_agent_takes_a_rollback_that_comes_as_a_newer_document_and_a_tombstone_with_its_seq(agent):
    agent._receive_release(3, _doc(3, 20, seq=12))
    agent._receive_release(3, _doc(3, 10, seq=13, version_hash="1badc0de"))  # the operator deleted release 20
    assert agent.queue.queued(3)["release"]["id"] == 10
    agent._receive_release(3, _doc(3, None, seq=14))
    assert agent.queue.queued(3)["release"] is None
    agent._receive_release(3, _doc(3, 10, seq=13, version_hash="1badc0de"))
    assert agent.queue.queued(3)["release"] is None


def test_a_release_document_without_seq_from_an_older_server_is_queued(agent):
    agent._receive_release(4, _doc(4, 30))
    assert agent.queue.queued(4)["release"]["id"] == 30
    assert agent.queue.highest_seq(4) is None


# --- the server's side --------------------------------------------------------------------------------------------

def _captured(published):
    """A publish_many that takes everything and records (topic, document)."""
    def publish_many(messages):
        published.extend((topic, json.loads(payload) if payload else None) for topic, payload in messages)
        return [True] * len(messages)
    return publish_many


def _fleet(count=2):
    from fleet_server import models
    from fleet_server.extensions import db

    devices = [models.Device(name=f"d{i}") for i in range(count)]
    project = models.Project(name="seq")
    db.session.add_all([project, *devices])
    db.session.commit()
    return project, devices


def _release(project, devices, version):
    from fleet_server.releases import service

    container = {"name": "app", "image": "busybox", "tag": version, "required_tags": [], "purge_data": False,
                 "registry_id": None, "startup_parameters": {}}
    return service.create_release(project, {"version": version, "device_ids": [d.id for d in devices],
                                            "containers": [container], "remove_containers": []})


def test_the_seq_only_grows_across_create_retarget_and_delete(app):
    from fleet_server.messaging import outbox
    from fleet_server.releases import service

    with app.app_context():
        project, (first, second) = _fleet()
        flushes = []

        def flush():
            published = []
            outbox.flush(_captured(published))
            flushes.append({topic.split("/")[3]: (document["seq"], document["release"]["version"])
                            for topic, document in published})

        _release(project, [first, second], "1.0.0")
        flush()
        newer = _release(project, [first, second], "2.0.0")
        flush()
        service.update_release(newer, {"device_ids": [first.id]})  # re-targeted: the second falls back to 1.0.0
        flush()
        service.delete_release(newer)  # rolled back: the first falls back to 1.0.0 too
        flush()
        seqs = [{seq for seq, _version in published.values()} for published in flushes]
        assert all(len(seq) == 1 for seq in seqs), seqs  # one seq a flush
        seqs = [seq.pop() for seq in seqs]
        assert all(isinstance(seq, int) for seq in seqs) and seqs == sorted(set(seqs)), seqs  # each higher
        assert [published[second.unit_id][1] for published in flushes[:3]] == ["1.0.0", "2.0.0", "1.0.0"]
        assert [published[first.unit_id][1] for published in flushes[1:]] == ["2.0.0", "2.0.0", "1.0.0"]
        assert outbox.highest_published() == seqs[-1] == outbox.highest_issued()


def test_a_tombstone_carries_a_seq_and_a_failed_publication_never_gives_its_seq_out_again(app):
    from fleet_server.messaging import outbox
    from fleet_server.extensions import db
    from fleet_server.projects import service as projects

    with app.app_context():
        project, (device, _other) = _fleet()
        published = []
        _release(project, [device], "1.0.0")
        outbox.flush(lambda messages: [False] * len(messages))  # the broker took nothing
        lost = outbox.highest_issued()

        def fails_halfway(messages):
            _captured(published)(messages[:1])
            raise ConnectionError("broker gone")

        outbox.enqueue([_other.unit_id], project.id)
        db.session.commit()
        with pytest.raises(ConnectionError):
            outbox.flush(fails_halfway, batch=1)
        halfway = published[-1][1]["seq"]
        assert halfway > lost
        projects.delete_project(db.session.get(type(project), project.id), force=True)
        outbox.flush(_captured(published))
        tombstone = published[-1][1]
        assert tombstone["release"] is None and tombstone["seq"] > halfway


def test_the_marker_check_republishes_every_topic_when_the_broker_is_behind_and_nothing_when_it_is_not(app):
    from fleet_server.messaging import outbox
    from fleet_server.extensions import db
    from fleet_server.models import Publication

    def pending():
        return sorted(set(db.session.execute(db.select(Publication.unit_id, Publication.project_id)).all()))

    with app.app_context():
        assert outbox.reconcile_with_marker(lambda: None) == 0 and pending() == []  # nothing ever published
        project, devices = _fleet(3)
        _release(project, devices, "1.0.0")
        outbox.flush(_captured([]))
        published = outbox.highest_published()
        assert outbox.reconcile_with_marker(lambda: published) == published and pending() == []
        outbox.reconcile_with_marker(lambda: published - 1)
        assert pending() == sorted((d.unit_id, project.id) for d in devices)
        outbox.flush(_captured([]))
        outbox.reconcile_with_marker(lambda: None)
        assert len(pending()) == 3


def test_a_marker_ahead_of_the_database_moves_the_sequence_past_it(app):
    """A database restored from a backup: devices have seen seqs the database never issued."""
    from fleet_server.messaging import outbox

    with app.app_context():
        project, devices = _fleet(1)
        _release(project, devices, "1.0.0")
        outbox.flush(_captured([]))
        ahead = outbox.highest_issued() + 1000
        outbox.reconcile_with_marker(lambda: ahead)
        published = []
        outbox.flush(_captured(published))
        assert published and published[0][1]["seq"] > ahead


def test_bump_seq_moves_the_sequence_past_now_and_queues_every_topic(app):
    from fleet_server.messaging import outbox
    from fleet_server.cli import main

    with app.app_context():
        project, devices = _fleet(2)
        _release(project, devices, "1.0.0")
        outbox.flush(_captured([]))
        before = outbox.highest_issued()
    result = CliRunner().invoke(main, ["releases", "bump-seq", "--skip-broker", "--to", str(before + 5)],
                                obj=ScriptInfo(create_app=lambda: app))
    assert result.exit_code == 0, result.output
    assert "2 release topic(s) queued" in result.output
    with app.app_context():
        published = []
        outbox.flush(_captured(published))
        assert len(published) == 2
        assert published[0][1]["seq"] > max(before + 5, int(time.time() * 1000) - 60_000)


# --- end to end: the broker crash that rolled a device back ------------------------------------------------------

_CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {data}/
# The test saves a snapshot itself (SIGUSR1) and kills the broker long before the next autosave.
autosave_interval 3600
set_tcp_nodelay true
max_queued_messages 10000
user root
log_dest stdout
"""


class SnapshotBroker:
    """A Mosquitto of the test's own: snapshots on demand, killed with SIGKILL, started again on the same port."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        (directory / "data").mkdir(parents=True)
        self.config = directory / "mosquitto.conf"
        self.config.write_text(_CONFIG.format(port=self.port, data=directory / "data"))
        self.url = f"mqtt://{LOOPBACK}:{self.port}"
        self.process = None

    def start(self):
        log = open(self.directory / "mosquitto.log", "ab")
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_for_mqtt(LOOPBACK, self.port, timeout=30)

    def snapshot(self):
        snapshot = self.directory / "data" / "mosquitto.db"
        before = snapshot.stat().st_mtime_ns if snapshot.exists() else None
        self.process.send_signal(signal.SIGUSR1)
        eventually(lambda: snapshot.exists() and snapshot.stat().st_mtime_ns != before, 10,
                   message="the broker's persistence snapshot")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def retained(self, topic, settle=0.5):
        received = []
        client, _ = connect_mqtt(LOOPBACK, self.port, on_message=lambda c, u, m: received.append(m.payload))
        try:
            subscribe_and_wait(client, topic)
            time.sleep(settle)
        finally:
            close_mqtt(client)
        return json.loads(received[-1]) if received and received[-1] else None


@pytest.fixture
def snapshot_broker(tmp_path):
    broker = SnapshotBroker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def _deployed(stack, agent, release):
    slept = agent.sleep()
    assert slept.returncode == 0, slept.stderr + stack.logs()
    assert json.loads(slept.stdout)["return"][-1]["state"] == "succeeded", slept.stdout + stack.logs()
    project_id, release_id = release["project"], release["id"]
    eventually(lambda: stack.get(f"/docker/projects/{project_id}/releases/{release_id}/").json()
               ["successful_deployments"], 30, message=f"release {release['version']} recorded as deployed")


@pytest.mark.slow
def test_a_broker_killed_inside_its_autosave_interval_never_rolls_a_device_back(
        snapshot_broker, docker_client, unique_name, tmp_path):
    with running_stack(snapshot_broker.url, docker_client, tmp_path) as stack:
        device = stack.create_device("crash")
        state_dir = tmp_path / "agent-state"
        agent = stack.start_agent(device, state_dir=state_dir)
        project = stack.post("/docker/projects/", json={"name": "seq"}).json()
        topic = wire.release_topic(device["unit_id"], project["id"])
        name = f"app{uuid.uuid4().hex[:8]}"

        def create(version, tag):
            image = unique_name.image("seq", tag=tag)
            build_busybox_variant(docker_client, image, cmd=["sleep", "3600"])
            body = release_payload([device["id"]], *image.rsplit(":", 1), name=name)
            body["version"] = version
            created = stack.post(f"/docker/projects/{project['id']}/releases/", json=body)
            assert created.status_code == 201, created.text
            return {**created.json(), "project": project["id"]}

        def marker_reached(release_id):
            document = snapshot_broker.retained(topic)
            marker = snapshot_broker.retained(wire.RELEASE_SEQ_MARKER_TOPIC)
            return (document and document["release"]["id"] == release_id and marker
                    and marker["seq"] >= document["seq"])

        def queued_release():
            path = state_dir / "projects" / str(project["id"]) / "queued.json"
            return path.exists() and (json.loads(path.read_text())["release"] or {}).get("id")

        first = create("1.0.0", "v1")
        eventually(lambda: queued_release() == first["id"], 30, message="1.0.0 queued")
        _deployed(stack, agent, first)
        eventually(lambda: marker_reached(first["id"]), 20, message="the marker to pass 1.0.0")
        snapshot_broker.snapshot()  # the broker's last save before the crash holds 1.0.0

        second = create("2.0.0", "v2")
        eventually(lambda: queued_release() == second["id"], 30, message="2.0.0 queued")
        _deployed(stack, agent, second)
        agent.process.stop()

        third = create("3.0.0", "v3")
        eventually(lambda: marker_reached(third["id"]), 20, message="the marker to pass 3.0.0")
        worker_id = stack.worker.args[stack.worker.args.index("--worker-id") + 1]
        stack.worker.stop()  # held back so that the agent meets the broker as the crash left it

        offset = len(agent.process.log())
        snapshot_broker.kill()
        snapshot_broker.start()
        restored = snapshot_broker.retained(topic)
        assert restored["release"]["id"] == first["id"], "the reproduction needs the snapshot's 1.0.0 on the broker"

        agent = stack.start_agent(device, state_dir=state_dir)
        eventually(lambda: "ignored an older release document" in agent.process.log(), 30,
                   message="the agent to meet and ignore the snapshot's 1.0.0" + agent.process.log()[-3000:])
        assert queued_release() != first["id"]

        stack.worker = stack.start_worker(worker_id)
        eventually(lambda: queued_release() == third["id"], 60,
                   message="3.0.0 published again and queued" + stack.logs())
        assert "lost retained releases" in stack.worker.log()
        _deployed(stack, agent, third)

        owned = docker_client.containers.list(all=True, filters={"label": f"fleet.unit_id={device['unit_id']}"})
        assert [c.labels["fleet.release"] for c in owned] == [str(third["id"])]
        assert stack.get(f"/dongle/devices/{device['id']}/").json()["docker_releases"] == [third["id"]]
        since_the_crash = agent.process.log()[offset:].splitlines()
        assert not [line for line in since_the_crash if f"release={first['id']} " in line and "state=" in line]


def test_the_marker_is_read_from_the_broker_missing_present_or_malformed(snapshot_broker):
    from fleet_server.messaging import outbox

    config = {"FLEET_MQTT_URL": snapshot_broker.url}
    assert outbox.read_marker(config, grace=0.5) is None
    client, _ = connect_mqtt(LOOPBACK, snapshot_broker.port)
    try:
        client.publish(wire.RELEASE_SEQ_MARKER_TOPIC, outbox.marker_payload(41), qos=1, retain=True).wait_for_publish(5)
        assert outbox.read_marker(config) == 41
        client.publish(wire.RELEASE_SEQ_MARKER_TOPIC, b'{"v": 1, "seq": "many"}', qos=1, retain=True).wait_for_publish(5)
        assert outbox.read_marker(config, grace=0.5) is None  # taken as missing: everything is published again
    finally:
        close_mqtt(client)
    with pytest.raises(outbox.BrokerUnavailable):
        outbox.read_marker({"FLEET_MQTT_URL": f"mqtt://{LOOPBACK}:{free_port()}"}, timeout=1)
