"""The agent's command machinery as pure logic: argument schemas, output caps, the journal, the runner.

The MQTT client is replaced by a recorder here; the real broker, engine and agent process are
exercised in test_commands_e2e.py.
"""
import json
import logging
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

import fleet_wire as wire

from fleet_device import commands, logbuffer
from fleet_device.commands import CommandJournal, CommandRunner, cap_output
from tests.support.stack import eventually


# --- argument schemas --------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, arg, kwarg, complaint",
    [
        ("no.such", [], {}, "unknown command 'no.such'"),
        ("docker.logs", [], {}, "missing a required argument: 'name'"),
        ("docker.logs", ["a", "b", "c", "d", "e"], {}, "too many positional arguments"),
        ("docker.logs", ["web"], {"colour": "red"}, "unexpected keyword argument 'colour'"),
        ("docker.logs", [5], {}, "argument 'name' must be a string"),
        ("docker.logs", ["web"], {"tail": True}, "argument 'tail' must be an integer or a string"),
        ("docker.ps", [], {"label": [1]}, "argument 'label' must be a string or a list of strings or null"),
        ("minionutil.last_logs", [], {"num": "ten"}, "argument 'num' must be an integer"),
        ("docker.logs", "web", {}, "arg must be a list"),
        ("docker.logs", ["web"], ["tail"], "kwarg must be an object"),
    ],
)
def test_a_call_that_does_not_fit_the_signature_fails_naming_the_problem(name, arg, kwarg, complaint):
    with pytest.raises(commands.CommandError, match=complaint.replace("(", r"\(")):
        commands.check_arguments(name, arg, kwarg)


def test_a_type_error_inside_a_command_is_not_reported_as_a_bad_call(monkeypatch):
    def broken(agent):
        return len(None)

    monkeypatch.setitem(commands.COMMANDS, "test.broken", commands.Command(
        "test.broken", broken, "", __import__("inspect").signature(broken), {}, 1.0))
    with pytest.raises(TypeError, match="NoneType"):
        commands.execute(None, "test.broken", [], {})


def test_every_command_the_issue_names_is_in_the_table():
    assert {"docker.logs", "docker.ps", "docker.inspect", "docker.restart", "docker.stop", "docker.start",
            "minionutil.last_logs", "state.sls", "test.ping", "grains.items"} <= set(commands.COMMANDS)


# --- output caps ---------------------------------------------------------------------------

def test_short_output_passes_unchanged():
    assert cap_output({"a": [1, "x"]}, 100) == ({"a": [1, "x"]}, False)


def test_long_text_keeps_its_end_behind_a_clear_marker():
    text = "".join(f"line {n}\n" for n in range(10000))
    capped, truncated = cap_output(text, 1000)
    assert truncated and capped.startswith("[output truncated: showing the last ")
    assert capped.endswith("line 9999\n") and len(json.dumps(capped)) < 1200


def test_long_text_of_escaped_characters_still_fits():
    capped, truncated = cap_output("é\"" * 5000, 1000)
    assert truncated and len(json.dumps(capped)) < 1200


def test_long_structured_output_becomes_marked_json_text():
    capped, truncated = cap_output([{"n": n} for n in range(1000)], 500)
    assert truncated and capped.startswith("[output truncated: the first 500 of ")


# --- the journal ---------------------------------------------------------------------------

def _result(command_id, state="succeeded"):
    return {"id": command_id, "state": state, "return": True, "error": None, "truncated": False,
            "started_at": 1.0, "finished_at": 2.0, "ts": 2.0}


def test_accepted_ids_and_unacknowledged_results_survive_a_restart(tmp_path):
    journal = CommandJournal(tmp_path)
    assert journal.accept("a") and journal.accept("b") and journal.accept("c")
    assert not journal.accept("a")
    journal.record_result(_result("a"))
    journal.record_result(_result("b"))
    journal.acknowledge("a")
    journal.close()

    again = CommandJournal(tmp_path)
    assert again.seen("a") and again.seen("b") and again.seen("c") and not again.seen("d")
    assert [r["id"] for r in again.pending_results()] == ["b"]
    assert again.unfinished == {"c"}


def test_a_torn_last_line_is_skipped(tmp_path):
    journal = CommandJournal(tmp_path)
    journal.accept("a")
    journal.close()
    with open(tmp_path / "journal.log", "ab") as handle:
        handle.write(b'{"accepted": "b')
    assert CommandJournal(tmp_path).seen("a")


def test_the_journal_stays_bounded_but_keeps_what_is_still_needed(tmp_path):
    journal = CommandJournal(tmp_path, remember=10, recent_results=5)
    journal.accept("unsent")
    journal.record_result(_result("unsent"))
    for n in range(100):
        journal.accept(f"id-{n}")
        journal.record_result(_result(f"id-{n}"))
        journal.acknowledge(f"id-{n}")
    journal.close()
    assert len((tmp_path / "journal.log").read_bytes().splitlines()) <= 3 * 10 + 1
    again = CommandJournal(tmp_path, remember=10, recent_results=5)
    assert again.seen("id-99") and not again.seen("id-0")
    assert [r["id"] for r in again.pending_results()] == ["unsent"]
    assert again.result("id-99")["state"] == "succeeded" and again.result("id-0") is None


def test_only_commands_that_change_the_device_are_flushed_to_disk_before_they_run(tmp_path, monkeypatch):
    import os

    flushed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd)))
    journal = CommandJournal(tmp_path)
    journal.accept("ping", durable=False)
    journal.record_result(_result("ping"), durable=False)
    assert flushed == []
    journal.accept("restart")
    journal.record_result(_result("restart"))
    assert len(flushed) == 2
    journal.close()
    # Written all the same: a repeat of either is answered from the journal after a restart.
    again = CommandJournal(tmp_path)
    assert again.seen("ping") and again.result("ping")["state"] == "succeeded"
    assert [r["id"] for r in again.pending_results()] == ["ping", "restart"]


def test_commands_that_change_the_device_are_never_marked_read_only():
    changing = {"state.sls", "docker.restart", "docker.stop", "docker.start"}
    assert not any(commands.is_read_only(name) for name in changing)
    assert not commands.is_read_only("no.such.command")
    assert {name for name, entry in commands.COMMANDS.items() if entry.read_only} == {
        "test.ping", "grains.items", "minionutil.last_logs", "docker.logs", "docker.ps", "docker.inspect"
    }


def test_only_commands_answered_from_memory_are_instant_and_an_instant_command_must_be_read_only():
    assert {name for name, entry in commands.COMMANDS.items() if entry.instant} == {"test.ping", "minionutil.last_logs"}
    with pytest.raises(ValueError, match="must be read-only"):
        commands.command("test.rash", instant=True)
    assert "test.rash" not in commands.COMMANDS


# --- the runner ----------------------------------------------------------------------------

class RecordingClient:
    """Stands in for paho: records what is published, acknowledges at once."""

    def __init__(self):
        self.messages = []

    def publish(self, topic, payload, qos=0, retain=False, correlation=None):
        self.messages.append((topic, json.loads(payload), correlation))
        return SimpleNamespace(is_published=lambda: True)

    def results(self, command_id):
        return [body for topic, body, _ in self.messages if body["id"] == command_id]


@pytest.fixture
def agent():
    """What the runner is given: a command context (unit id, recent logs) and, as `client`, the recorder."""
    return SimpleNamespace(unit_id=str(uuid.uuid4()), client=RecordingClient(), recent_logs=logbuffer.install())


@pytest.fixture
def runner(agent, tmp_path):
    running = CommandRunner(agent, agent.client, tmp_path / "commands", max_parallel=2, progress_delay=0.1)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def slow_command(monkeypatch):
    release = threading.Event()

    @commands.command("test.wait")
    def wait(agent, seconds: float):
        release.wait(seconds)
        return "done"

    yield release
    release.set()
    monkeypatch.delitem(commands.COMMANDS, "test.wait")


def _message(unit_id, name="test.ping", arg=(), kwarg=None, timeout=None, deadline=None, command_id=None):
    body = {"id": command_id or str(uuid.uuid4()), "command": name, "arg": list(arg), "kwarg": kwarg or {},
            "timeout": timeout, "deadline": deadline or time.time() + 60}
    return SimpleNamespace(payload=wire.encode(wire.from_builtins(wire.CommandMessage, body)), response_topic=None,
                           correlation=None, expires_in=None, id=body["id"])


def _final(agent, command_id):
    return eventually(
        lambda: [r for r in agent.client.results(command_id) if r["state"] in wire.FINAL_COMMAND_STATES],
        5, 0.01, message=f"a final result for {command_id}",
    )


def test_a_command_runs_and_its_result_names_the_command(agent, runner):
    message = _message(agent.unit_id)
    runner.handle_message(None, message)
    (result,) = _final(agent, message.id)
    assert result["state"] == "succeeded" and result["return"] is True
    topic, _, correlation = agent.client.messages[-1]
    assert topic == wire.device_topic(agent.unit_id, "results")
    assert correlation == message.id.encode()


@pytest.fixture
def counting_command(monkeypatch):
    calls = []

    @commands.command("test.count")
    def count(agent):
        calls.append(1)
        return len(calls)

    yield calls
    monkeypatch.delitem(commands.COMMANDS, "test.count")


def test_the_same_command_id_runs_once_and_a_repeat_gets_the_same_result_even_after_a_restart(
    agent, runner, tmp_path, counting_command
):
    message = _message(agent.unit_id, "test.count")
    runner.handle_message(None, message)
    (first,) = _final(agent, message.id)
    runner.handle_message(None, message)
    runner.stop()
    restarted = CommandRunner(agent, agent.client, tmp_path / "commands")
    restarted.handle_message(None, message)
    assert counting_command == [1]
    assert agent.client.results(message.id) == [first, first, first]


def test_an_expired_command_is_reported_expired_and_never_run(agent, runner, slow_command):
    message = _message(agent.unit_id, "test.wait", [5], deadline=time.time() - 1)
    runner.handle_message(None, message)
    (result,) = _final(agent, message.id)
    assert result["state"] == "expired" and result["started_at"] is None


def test_a_command_past_its_timeout_is_timed_out_and_the_runner_keeps_serving(agent, runner, slow_command):
    slow = _message(agent.unit_id, "test.wait", [30], timeout=0.3)
    runner.handle_message(None, slow)
    (result,) = _final(agent, slow.id)
    assert result["state"] == "timed_out" and "0.3 s" in result["error"]
    assert [r["state"] for r in agent.client.results(slow.id)] == ["running", "timed_out"]
    ping = _message(agent.unit_id)
    runner.handle_message(None, ping)
    assert _final(agent, ping.id)[0]["state"] == "succeeded"
    slow_command.set()
    time.sleep(0.1)
    assert len(agent.client.results(slow.id)) == 2  # the late outcome is dropped


def test_commands_beyond_the_parallel_limit_wait_as_delivered_then_run(agent, runner, slow_command):
    blockers = [_message(agent.unit_id, "test.wait", [30]) for _ in range(2)]
    for message in blockers:
        runner.handle_message(None, message)
    waiting = _message(agent.unit_id)
    runner.handle_message(None, waiting)
    eventually(lambda: agent.client.results(waiting.id), 5, 0.01, message="a delivered report")
    assert agent.client.results(waiting.id)[0]["state"] == "delivered"
    slow_command.set()
    assert _final(agent, waiting.id)[0]["state"] == "succeeded"
    assert [r["state"] for r in agent.client.results(waiting.id)] == ["delivered", "running", "succeeded"]


def test_a_command_thread_that_finished_takes_the_next_command_and_ends_when_left_idle(agent, tmp_path, monkeypatch):
    from fleet_device.commands import runner

    monkeypatch.setattr(runner, "IDLE_THREAD_SECONDS", 0.3)
    threads = []

    @commands.command("test.thread")
    def thread(agent):
        threads.append(threading.current_thread())
        return True

    running = CommandRunner(agent, agent.client, tmp_path / "commands")
    running.start()
    try:
        for _ in range(3):
            message = _message(agent.unit_id, "test.thread")
            running.handle_message(None, message)
            assert _final(agent, message.id)[0]["state"] == "succeeded"
        assert len(threads) == 3 and len(set(threads)) == 1  # one thread served them one after another
        eventually(lambda: not threads[0].is_alive(), 5, 0.05, message="the idle command thread to end")
        message = _message(agent.unit_id, "test.thread")
        running.handle_message(None, message)
        assert _final(agent, message.id)[0]["state"] == "succeeded" and threads[-1] is not threads[0]
    finally:
        running.stop()
        commands.COMMANDS.pop("test.thread", None)


def test_a_timeout_shorter_than_the_supervisors_next_look_is_enforced_on_time(agent, tmp_path, slow_command):
    """The supervisor looks at least once a second; a new command wakes it only for what falls
    due before that, like this timeout of 0.1 s."""
    running = CommandRunner(agent, agent.client, tmp_path / "commands", progress_delay=30)
    running.start()
    try:
        time.sleep(0.1)  # the supervisor has looked and sleeps until its next look, a second away
        slow = _message(agent.unit_id, "test.wait", [30], timeout=0.1)
        accepted = time.monotonic()
        running.handle_message(None, slow)
        (result,) = _final(agent, slow.id)
        assert result["state"] == "timed_out" and time.monotonic() - accepted < 0.8
    finally:
        running.stop()


def test_an_unknown_command_fails_naming_it(agent, runner):
    message = _message(agent.unit_id, "no.such")
    runner.handle_message(None, message)
    (result,) = _final(agent, message.id)
    assert result["state"] == "failed" and "unknown command 'no.such'" in result["error"]


def test_a_command_accepted_before_the_agent_stopped_is_reported_failed_at_start(agent, tmp_path):
    interrupted = str(uuid.uuid4())
    journal = CommandJournal(tmp_path / "commands")
    journal.accept(interrupted)
    journal.close()
    runner = CommandRunner(agent, agent.client, tmp_path / "commands")
    (pending,) = runner.journal.pending_results()
    assert pending["id"] == interrupted and pending["state"] == "failed" and "stopped" in pending["error"]
    runner.start()
    runner.connected()
    eventually(lambda: agent.client.results(interrupted), 5, 0.01, message="the resent result")
    time.sleep(0.3)
    assert runner.journal.pending_results(), "the broker's acknowledgement alone must not settle a result"
    runner.confirmed([interrupted])
    assert not runner.journal.pending_results()
    runner.stop()


def test_a_result_the_server_does_not_confirm_is_sent_again_until_it_does(agent, tmp_path):
    runner = CommandRunner(agent, agent.client, tmp_path / "commands")
    runner.resend_interval = 0.2
    runner.start()
    try:
        message = _message(agent.unit_id, "test.ping")
        runner.handle_message(None, message)
        eventually(lambda: len(_final(agent, message.id)) >= 3, 5, 0.02, message="the result sent three times")
        runner.confirmed([message.id])
        sent = len(_final(agent, message.id))
        time.sleep(0.6)
        assert len(_final(agent, message.id)) == sent
    finally:
        runner.stop()


def test_last_logs_returns_the_newest_lines_at_or_above_a_level(agent):
    logger = logging.getLogger("fleet_device.test")
    logger.setLevel(logging.DEBUG)
    marker = uuid.uuid4().hex
    logger.info("%s info", marker)
    logger.warning("%s warning", marker)
    lines = [line for line in commands.execute(agent, "minionutil.last_logs", [], {"num": 500}) if marker in line]
    assert lines[-2].endswith(f"{marker} info") and lines[-1].endswith(f"{marker} warning")
    warnings = commands.execute(agent, "minionutil.last_logs", [], {"num": 500, "level": "warning"})
    assert not any(line.endswith(f"{marker} info") for line in warnings)
    assert len(commands.execute(agent, "minionutil.last_logs", [], {"num": 1})) == 1
    with pytest.raises(commands.CommandError, match="unknown level"):
        commands.execute(agent, "minionutil.last_logs", [], {"level": "loud"})


# --- instant commands: run on the thread that accepted them -------------------------------

@pytest.fixture
def instant_command():
    """An instant command that notes where it ran and, when asked, holds on until released."""
    calls = []
    release = threading.Event()

    @commands.command("test.instant", read_only=True, instant=True)
    def instant(agent, hold: float = 0):
        calls.append(threading.current_thread())
        if hold:
            release.wait(hold)
        return len(calls)

    yield SimpleNamespace(calls=calls, release=release)
    release.set()
    commands.COMMANDS.pop("test.instant", None)


def test_an_instant_command_runs_and_is_answered_before_its_message_is_handled(agent, runner, instant_command):
    message = _message(agent.unit_id, "test.instant")
    runner.handle_message(None, message)
    # No waiting: the result was published on this thread, before the message could be acknowledged.
    (result,) = [r for r in agent.client.results(message.id) if r["state"] in wire.FINAL_COMMAND_STATES]
    assert result["state"] == "succeeded" and result["return"] == 1
    assert instant_command.calls == [threading.current_thread()]
    assert runner._running == 0 and not runner._active
    assert {"v": 1, **runner.journal.result(message.id)} == result
    runner.handle_message(None, message)  # delivered again: answered from the journal, not run
    assert instant_command.calls == [threading.current_thread()]
    assert agent.client.results(message.id) == [result, result]


def test_a_command_that_is_not_instant_runs_on_a_command_thread(agent, runner):
    where = []

    @commands.command("test.where", read_only=True)
    def note_where(agent):
        where.append(threading.current_thread())
        return True

    try:
        message = _message(agent.unit_id, "test.where")
        runner.handle_message(None, message)
        assert _final(agent, message.id)[0]["state"] == "succeeded"
        assert where and where[0] is not threading.current_thread()
    finally:
        commands.COMMANDS.pop("test.where", None)


def test_an_instant_command_waits_for_a_free_slot_like_any_other(agent, runner, slow_command, instant_command):
    blockers = [_message(agent.unit_id, "test.wait", [30]) for _ in range(2)]  # the runner's max_parallel is 2
    for message in blockers:
        runner.handle_message(None, message)
    waiting = _message(agent.unit_id, "test.instant")
    runner.handle_message(None, waiting)  # returns at once: it waits, it does not run here
    assert instant_command.calls == []
    eventually(lambda: agent.client.results(waiting.id), 5, 0.01, message="a delivered report")
    slow_command.set()
    assert _final(agent, waiting.id)[0]["state"] == "succeeded"
    assert [r["state"] for r in agent.client.results(waiting.id)] == ["delivered", "running", "succeeded"]
    assert instant_command.calls[0] is not threading.current_thread()


def test_an_instant_command_that_hangs_is_still_timed_out_and_its_late_result_dropped(agent, runner, instant_command):
    message = _message(agent.unit_id, "test.instant", [30], timeout=0.2)
    handling = threading.Thread(target=runner.handle_message, args=(None, message), daemon=True)
    handling.start()
    (result,) = _final(agent, message.id)
    assert result["state"] == "timed_out" and "0.2 s" in result["error"]
    assert handling.is_alive()  # the supervisor reported it while it still held the thread
    instant_command.release.set()
    handling.join(5)
    assert not handling.is_alive()
    assert [r["state"] for r in agent.client.results(message.id)] == ["running", "timed_out"]
    ping = _message(agent.unit_id)
    runner.handle_message(None, ping)
    assert agent.client.results(ping.id)[-1]["state"] == "succeeded"


def test_the_agents_inbox_holds_at_most_its_limit_and_leaves_the_rest_to_the_broker(tmp_path):
    from fleet_device import agent as agent_module

    device = agent_module.Agent(agent_module.AgentConfig(unit_id=str(uuid.uuid4()), state_dir=tmp_path,
                                                         minion_id_file=None),
                                deployer=SimpleNamespace(report=None))
    message = SimpleNamespace(topic="t", payload=b"", qos=1, mid=1)
    for _ in range(agent_module.INBOX_LIMIT + 5):
        device._on_message(message)
    assert device.inbox.qsize() == agent_module.INBOX_LIMIT
    device.command_runner.journal.close()
