"""The deploy journal's typed record reads the journal file agents have always written, and writes the same shape."""
import json
import uuid

import msgspec
import pytest

from fleet_device.deploy import OLD_SUFFIX, Deployer, Remove, Start, Stop, Verify
from fleet_device.deploy.journal import DeployJournal, DeployRecord, StepEntry
from tests.support.deploy import SERVE, message, owned_containers, release, spec, workload
from tests.support.stack import remove_agent_containers

PROJECT = 7


def journal_of_an_agent_killed_while_starting(name: str, image: str, v2: dict) -> dict:
    """A journal as the agent before the typed record wrote it: stopped and renamed v1, began starting v2."""
    container = v2["containers"][0]
    flat = {"image": None, "spec": None, "rename_to": None, "initial": False, "names": []}
    return {
        "project_id": PROJECT, "release_id": v2["id"], "version_hash": v2["version_hash"],
        "context": message(PROJECT, v2), "phase": "changing",
        "steps": [
            {**flat, "action": "stop", "target": name, "phase": "change", "rename_to": name + OLD_SUFFIX},
            {**flat, "action": "start", "target": name, "phase": "change", "image": image, "spec": container},
            {**flat, "action": "verify", "target": "", "phase": "verify", "names": [name]},
            {**flat, "action": "remove", "target": name + OLD_SUFFIX, "phase": "commit"},
        ],
        "progress": {"0": {"status": "done", "existed": True, "was_running": True}, "1": {"status": "started"}},
        "failure": None,
        "started_at": 1796305576.5987606,
    }


def test_a_journal_in_the_agents_format_reads_as_typed_steps_and_is_written_back_the_same(tmp_path):
    v2 = release(2, spec("app", "acme/app:v2"))
    written = journal_of_an_agent_killed_while_starting("app", "acme/app:v2", v2)
    path = tmp_path / "projects" / str(PROJECT) / "journal.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(written))

    journal = DeployJournal(tmp_path)
    record = journal.load(PROJECT)
    assert [record.step(i) for i in range(4)] == [
        Stop("app", rename_to="app" + OLD_SUFFIX), Start("app", "acme/app:v2", v2["containers"][0]),
        Verify(("app",)), Remove("app" + OLD_SUFFIX)]
    assert record.progress_of(0).was_running and record.progress_of(1).status == "started"
    assert record.context == message(PROJECT, v2) and not record.settled

    journal.save(record)
    assert json.loads(path.read_text()) == written


def test_every_step_type_goes_through_the_journal_unchanged():
    steps = [Stop("a", rename_to="a" + OLD_SUFFIX, initial=True), Start("a", "acme/a:1", {"name": "a"}),
             Verify(("a", "b")), Remove("a" + OLD_SUFFIX)]
    assert [StepEntry.of(step).to_step() for step in steps] == steps
    record = DeployRecord.begin(PROJECT, release(3, spec("a", "acme/a:1")), steps, context=None)
    written = json.loads(msgspec.json.encode(record))
    assert list(written) == ["project_id", "release_id", "version_hash", "context", "phase", "steps", "progress",
                             "failure", "started_at"]
    assert all(list(entry) == ["action", "target", "phase", "image", "spec", "rename_to", "initial", "names"]
               for entry in written["steps"])


@pytest.mark.parametrize("content", [b"{not json", b'{"project_id": 7}', b"[]",
                                     json.dumps({"project_id": 7, "release_id": 1, "version_hash": "x", "context": None,
                                                 "phase": "changing", "steps": [{"action": "reboot", "target": "",
                                                                                 "phase": "change"}]}).encode()])
def test_an_unreadable_journal_is_skipped_not_a_crash(tmp_path, content):
    path = tmp_path / "projects" / str(PROJECT) / "journal.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert DeployJournal(tmp_path).load(PROJECT) is None and DeployJournal(tmp_path).records() == []


def test_a_deploy_the_agent_left_in_its_journal_format_is_rolled_back_by_this_agent(
        docker_client, unique_name, tmp_path):
    unit_id, name = str(uuid.uuid4()), unique_name("app")
    v1_image = workload(docker_client, unique_name, "v1")
    v2_image = workload(docker_client, unique_name, "v2", tag="v2")
    v2 = release(2, spec(name, v2_image))
    labels = {"fleet.unit_id": unit_id, "fleet.project": str(PROJECT), "fleet.version_hash": "0000cafe"}
    try:
        old = docker_client.containers.run(v1_image, SERVE, name=name, detach=True, network_mode="none",
                                           labels={**labels, "fleet.release": "1"})
        old.stop(timeout=1)
        old.rename(name + OLD_SUFFIX)
        docker_client.containers.run(v2_image, SERVE, name=name, detach=True, network_mode="none",
                                     labels={**labels, "fleet.release": "2"})
        path = tmp_path / "projects" / str(PROJECT) / "journal.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(journal_of_an_agent_killed_while_starting(name, v2_image, v2)))

        (outcome,) = Deployer(unit_id, tmp_path, client=docker_client).recover()

        assert (outcome.state, outcome.step, outcome.context) == ("rolled_back", "start", message(PROJECT, v2))
        owned = owned_containers(docker_client, unit_id, PROJECT)
        assert list(owned) == [name] and owned[name].id == old.id and owned[name].status == "running"
        assert json.loads(path.read_text())["phase"] == "rolled_back"
    finally:
        remove_agent_containers(docker_client, [unit_id])
