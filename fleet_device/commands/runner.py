"""Running remote commands on the agent: at most once per id, within their deadline and timeout,
with every final result kept on disk until the server confirmed it stored it.

Which commands were accepted, and their results until the server confirms them, are kept in
the command journal (journal.py).

Each command runs in a thread of its own, at most `max_parallel` at once, never on the MQTT
network thread or the agent's message thread, so a long deploy does not hold up a ping. The
exception is an `instant` command (test.ping, minionutil.last_logs: answered from memory at
once): when a slot is free it runs on the message thread right after it is journaled, which
spares a thread wake-up on two busy cores; it still takes a slot and is still timed. A thread
that finished a command waits a while for the next one: handing a command to a waiting thread
is quicker than starting one (which waits for the new thread to run). One
supervisor thread enforces timeouts (the command is reported `timed_out` and its late result
discarded: Python cannot kill a thread, so it is left to finish in the background), reports
`delivered`/`running` for commands that take a while, and resends what is unconfirmed: after
every reconnect, and each `resend_interval` seconds while the server stays silent about it
(a broker that restarts can acknowledge a result and drop it before any worker is subscribed).
"""
from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import fleet_wire as wire

from ..mqtt import Received
from . import registry
from .context import CommandContext
from .journal import CommandJournal

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 256 * 1024
# A command thread with nothing to run ends after this many seconds.
IDLE_THREAD_SECONDS = 60.0


# --- output ------------------------------------------------------------------------------

def cap_output(value, limit: int = MAX_OUTPUT_BYTES):
    """(value, truncated): the value as JSON can carry it, cut to about `limit` bytes with a marker.

    A string keeps its end (the newest output); anything else becomes its JSON text, cut.
    """
    encoded = json.dumps(value, default=str)
    if len(encoded) <= limit:
        return json.loads(encoded), False
    if isinstance(value, str):
        kept = value[-limit:]
        while len(json.dumps(kept)) > limit:  # escapes (non-ASCII, quotes) make JSON longer than the text
            kept = kept[len(kept) // 4:]
        marker = f"[output truncated: showing the last {len(kept)} of {len(value)} characters]\n"
        return marker + kept, True
    return (f"[output truncated: the first {limit} of {len(encoded)} bytes of its JSON follow, "
            f"so it is not valid JSON]\n{encoded[:limit]}"), True


def _cap_error(text: str | None) -> str | None:
    if text is None or len(text) <= wire.MAX_COMMAND_ERROR:
        return text
    marker = " [error truncated]"
    return text[: wire.MAX_COMMAND_ERROR - len(marker)] + marker


# --- running -----------------------------------------------------------------------------

@dataclass
class CommandRun:
    id: str
    name: str
    arg: list
    kwarg: dict
    timeout: float
    deadline: float  # epoch seconds, from the server
    expires_monotonic: float | None = None  # from the broker's remaining MessageExpiryInterval
    correlation: bytes | None = None
    durable: bool = True  # journaled with fsyncs: false only for read-only commands
    instant: bool = False  # answers from memory at once: may run on the thread that accepted it
    accepted_monotonic: float = field(default_factory=time.monotonic)
    state: str = "delivered"
    started_at: float | None = None
    started_monotonic: float | None = None
    progress_reported: bool = False
    finished: bool = False

    def expired(self) -> bool:
        if time.time() >= self.deadline:
            return True
        return self.expires_monotonic is not None and time.monotonic() >= self.expires_monotonic


class CommandRunner:
    """Runs the commands the server sends (at most once each) and those the local API asks for.

    `context` is what the commands may reach; `mqtt` publishes the results (anything with the
    device MQTT session's `publish(topic, payload, qos=, correlation=)`).
    """

    def __init__(self, context: CommandContext, mqtt, directory: Path, max_parallel: int = 4,
                 progress_delay: float = 0.25, max_output: int = MAX_OUTPUT_BYTES):
        self.context = context
        self.mqtt = mqtt
        self.journal = CommandJournal(directory)
        self.max_parallel = max_parallel
        self.progress_delay = progress_delay
        self.max_output = max_output
        self._lock = threading.Lock()
        self._active: dict[str, CommandRun] = {}
        self._waiting: collections.deque[CommandRun] = collections.deque()
        self._running = 0
        # command id → (paho MQTTMessageInfo, monotonic time) of its final result's last send,
        # until the server confirms it
        self._in_flight: dict[str, tuple] = {}
        self.resend_interval = 30.0
        self._next_resend = 0.0
        # Commands handed to the command threads, and how many threads wait for one and are not
        # yet promised one (both under `_lock`): a thread is started only when none waits.
        self._handed: queue.SimpleQueue[CommandRun] = queue.SimpleQueue()
        self._idle_threads = 0
        self._wakeup = threading.Event()
        # When the supervisor looks next (monotonic, under `_lock`): never more than
        # `progress_delay` away, so a new command wakes it only for what falls due sooner.
        self._next_check = 0.0
        self._resend = threading.Event()
        self._stopping = threading.Event()
        self.abandoned = 0
        for command_id in sorted(self.journal.unfinished):
            log.warning("command=%s was accepted but the agent stopped before it finished", command_id)
            self.journal.record_result(self._result(
                command_id, "failed",
                error="the agent stopped while this command was pending or running; it may have partly run, "
                      "and it is not run again",
            ))

    @property
    def results_topic(self) -> str:
        return wire.device_topic(self.context.unit_id, "results")

    # --- MQTT side: all tiny, none of it blocks -------------------------------------------

    def connected(self):
        """The agent (re)connected: send again the results the server has not confirmed."""
        self._resend.set()
        self._wakeup.set()

    def confirmed(self, ids):
        """The server stored these results (by command id): they need not be sent again."""
        with self._lock:
            for command_id in ids:
                self._in_flight.pop(command_id, None)
        for command_id in ids:
            self.journal.acknowledge(command_id)

    def handle_message(self, where: wire.DeviceTopic, message: Received):
        """A command arrived (agent message thread): journal it, then hand it to a thread of its own."""
        command = wire.decode(wire.CommandMessage, message.payload)
        command_id = str(command.id)
        if message.response_topic not in (None, self.results_topic):
            log.warning("command=%s asks for results on %s; they go to %s", command_id, message.response_topic,
                        self.results_topic)
        run = CommandRun(
            id=command_id,
            name=command.command,
            arg=command.arg,
            kwarg=command.kwarg,
            timeout=command.timeout or registry.timeout_of(command.command),
            deadline=command.deadline,
            expires_monotonic=time.monotonic() + message.expires_in if message.expires_in is not None else None,
            correlation=message.correlation,
            durable=not registry.is_read_only(command.command),
            instant=registry.is_instant(command.command),
        )
        try:
            fresh = self.journal.accept(command_id, run.durable)
        except OSError as exc:
            # Without the journal, running it could run it twice; say so rather than go quiet.
            log.error("command=%s cannot be journaled: %s", command_id, exc)
            self._publish(self._result(command_id, "failed", error=f"the agent cannot record the command: {exc}"),
                          run.correlation, kept=False)
            return
        if not fresh:
            self._answer_repeat(command_id, run.correlation)
            return
        if not run.instant:  # an instant one logs its outcome a moment later; one line is enough
            log.info("command=%s name=%s accepted", command_id, run.name)
        if run.expired():
            self._finish(run, "expired", error="the command's TTL passed before it reached the device; not run")
            return
        with self._lock:
            self._active[run.id] = run
            self._waiting.append(run)
            started = self._start_waiting_locked()
            # Its `delivered`/`running` report is due no sooner than the supervisor's next look;
            # only a timeout shorter than that, or having to wait for a free slot, needs it sooner.
            # Not waking it spares a thread switch on every quick command.
            wake = run not in started or run.started_monotonic + run.timeout < self._next_check
        if wake:
            self._wakeup.set()
        if run.instant and run in started:
            # Run here rather than hand it to a command thread: it holds a slot like any other
            # (max_parallel) and stays in `_active`, so the supervisor would still time it out.
            started.remove(run)
            self._report_started(started)
            self._run(run)
            return
        self._report_started(started)

    def _answer_repeat(self, command_id: str, correlation: bytes | None):
        """The command came again: say how it stands (the server asks when it heard nothing), never rerun it."""
        with self._lock:
            run = self._active.get(command_id)
            state = run.state if run else None
            started_at = run.started_at if run else None
        result = None if run else self.journal.result(command_id)
        if run is not None:
            log.info("command=%s delivered again; it is %s", command_id, state)
            self._publish(self._result(command_id, state, started_at=started_at), correlation, kept=False)
        elif result is not None:
            log.info("command=%s delivered again; it ran already, its result is sent again", command_id)
            self._publish(result, correlation, kept=False)
        else:
            log.info("command=%s delivered again; it ran long ago and runs only once", command_id)

    # --- local API -------------------------------------------------------------------------

    def run_now(self, name: str, arg: list, kwarg: dict, timeout: float | None = None) -> dict:
        """Run a command in this thread's stead and wait for it (local API); not journaled."""
        timeout = timeout or registry.timeout_of(name)
        outcome: dict = {}
        started_at = time.time()

        def target():
            outcome.update(self._execute(name, arg, kwarg))

        worker = threading.Thread(target=target, name="command-local", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            self.abandoned += 1
            log.warning("local command %s still running after %.1f s; no longer waited for", name, timeout)
            return self._body("timed_out", None, _timeout_error(timeout), False, started_at, time.time())
        return self._body(outcome["state"], outcome.get("return"), outcome.get("error"),
                          outcome.get("truncated", False), started_at, time.time())

    # --- threads -------------------------------------------------------------------------

    def start(self):
        self._supervisor = threading.Thread(target=self._supervise, name="command-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self):
        self._stopping.set()
        self._wakeup.set()
        supervisor = getattr(self, "_supervisor", None)
        if supervisor is not None:
            supervisor.join(5)

    def _start_waiting_locked(self) -> list[CommandRun]:
        """Mark waiting commands running while there is room; returns them for `_report_started`,
        which starts their threads. Call with the lock held."""
        started = []
        while self._waiting and self._running < self.max_parallel:
            run = self._waiting.popleft()
            if run.finished:
                continue
            if run.expired():
                # Waited past its deadline behind other commands: the supervisor reports it.
                self._waiting.appendleft(run)
                break
            run.state = "running"
            run.started_at = time.time()
            run.started_monotonic = time.monotonic()
            self._running += 1
            started.append(run)
        return started

    def _report_started(self, runs: list[CommandRun]):
        """Report `running` where `delivered` was reported, then start: a quick command's final
        result must not overtake its `running` report."""
        for run in runs:
            if run.progress_reported:  # it was reported `delivered` while it waited
                self._publish(self._result(run.id, "running", started_at=run.started_at), run.correlation,
                              kept=False)
            with self._lock:
                start_one = self._idle_threads == 0
                if not start_one:
                    self._idle_threads -= 1  # that waiting thread takes this command
            self._handed.put(run)
            if start_one:
                threading.Thread(target=self._serve, name="command-runner", daemon=True).start()

    def _serve(self):
        """A command thread: runs the commands handed to it, ends after IDLE_THREAD_SECONDS without one."""
        while True:
            try:
                run = self._handed.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle_threads > 0:  # not promised a command: leave
                        self._idle_threads -= 1
                        return
                continue  # promised one just now: it is on its way
            self._run(run)
            with self._lock:
                self._idle_threads += 1

    def _run(self, run: CommandRun):
        outcome = self._execute(run.name, run.arg, run.kwarg)
        with self._lock:
            if run.finished:
                log.warning("command=%s finished after it was reported timed_out; its result is dropped", run.id)
                return
            run.finished = True
            self._active.pop(run.id, None)
            self._running -= 1
            started = self._start_waiting_locked()
        self._finish(run, outcome["state"], outcome.get("return"), outcome.get("error"),
                     outcome.get("truncated", False))
        self._report_started(started)

    def _execute(self, name: str, arg: list, kwarg: dict) -> dict:
        try:
            value = registry.execute(self.context, name, arg, kwarg)
        except registry.CommandError as exc:
            log.info("command %s failed: %s", name, exc)
            return {"state": "failed", "error": str(exc)}
        except Exception as exc:  # a bug or an engine error: a failed result, never a dead agent
            log.exception("command %s raised", name)
            return {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        value, truncated = cap_output(value, self.max_output)
        return {"state": "succeeded", "return": value, "truncated": truncated}

    def _supervise(self):
        while not self._stopping.is_set():
            try:
                timeout = self._check_runs()
                self._wakeup.wait(timeout)
                self._wakeup.clear()
                if self._resend.is_set():
                    self._resend.clear()
                    self._resend_unconfirmed(after_reconnect=True)
                elif time.monotonic() >= self._next_resend:
                    self._next_resend = time.monotonic() + min(1.0, self.resend_interval)
                    self._resend_unconfirmed(after_reconnect=False)
            except Exception:  # a bug must not leave timeouts unenforced for good
                log.exception("command supervisor failed; going on")
                self._stopping.wait(1.0)

    def _check_runs(self) -> float:
        """Time out, expire and report progress as due; returns seconds until something is due next."""
        now = time.monotonic()
        due = now + min(1.0, self.progress_delay)
        timed_out, expired, progress = [], [], []
        with self._lock:
            for run in list(self._active.values()):
                if run.state == "running":
                    limit = run.started_monotonic + run.timeout
                    if now >= limit:
                        run.finished = True
                        self._active.pop(run.id)
                        self._running -= 1
                        self.abandoned += 1
                        timed_out.append(run)
                        continue
                    due = min(due, limit)
                elif run.expired():
                    run.finished = True
                    self._active.pop(run.id)
                    expired.append(run)
                    continue
                else:
                    due = min(due, now + max(0.0, run.deadline - time.time()))
                    if run.expires_monotonic is not None:
                        due = min(due, run.expires_monotonic)
                if not run.progress_reported:
                    if now >= run.accepted_monotonic + self.progress_delay:
                        run.progress_reported = True
                        progress.append((run, run.state))
                    else:
                        due = min(due, run.accepted_monotonic + self.progress_delay)
            started = self._start_waiting_locked()
            self._next_check = due
        for run in timed_out:
            log.warning("command=%s name=%s still running after %.1f s: timed out", run.id, run.name, run.timeout)
            self._finish(run, "timed_out", error=_timeout_error(run.timeout))
        for run in expired:
            self._finish(run, "expired", error="the command's TTL passed while it waited on the device; not run")
        for run, state in progress:
            self._publish(self._result(run.id, state, started_at=run.started_at), run.correlation, kept=False)
        self._report_started(started)
        return max(0.0, due - time.monotonic())

    # --- results -------------------------------------------------------------------------

    def _body(self, state, value, error, truncated, started_at, finished_at) -> dict:
        return {"state": state, "return": value, "error": _cap_error(error), "truncated": truncated,
                "started_at": started_at, "finished_at": finished_at}

    def _result(self, command_id, state, value=None, error=None, truncated=False, started_at=None,
                finished_at=None) -> dict:
        return {"id": command_id, **self._body(state, value, error, truncated, started_at, finished_at),
                "ts": time.time()}

    def _finish(self, run: CommandRun, state, value=None, error=None, truncated=False):
        result = self._result(run.id, state, value, error, truncated, run.started_at, time.time())
        log.info("command=%s name=%s state=%s", run.id, run.name, state)
        # In the journal before it is sent (on disk, unless the command only reads): a result the
        # broker never acknowledged is sent again after a restart, rather than the command being
        # reported as interrupted.
        try:
            self.journal.record_result(result, run.durable)
            kept = True
        except OSError as exc:
            log.error("command=%s result cannot be journaled (%s); it is sent once, not kept", run.id, exc)
            kept = False
        self._publish(result, run.correlation, kept)

    def _track(self, command_id: str, info):
        # No wake-up of the supervisor: the server's confirmation marks the result in the journal,
        # and the supervisor's look for stale results comes within a second anyway.
        with self._lock:
            self._in_flight[command_id] = (info, time.monotonic())

    def _publish(self, result: dict, correlation: bytes | None, kept: bool):
        """Send a report; a final result `kept` in the journal stays there until the server confirms it."""
        try:
            payload = wire.encode(wire.from_builtins(wire.CommandResult, result))
        except wire.WireError as exc:  # a bug; the server must still hear that the command ended
            log.error("command=%s result does not fit the wire contract: %s", result["id"], exc)
            result = {**result, "return": None, "truncated": False, "error": _cap_error(f"unsendable result: {exc}")}
            try:
                payload = wire.encode(wire.from_builtins(wire.CommandResult, result))
            except wire.WireError:
                return None
        info = self.mqtt.publish(self.results_topic, payload, qos=1, correlation=correlation or result["id"].encode())
        if kept and result["state"] in wire.FINAL_COMMAND_STATES:
            self._track(result["id"], info)
        return info

    def _resend_unconfirmed(self, after_reconnect: bool):
        """Send again the final results the server has not confirmed.

        After a reconnect: each one the broker took (it may have dropped it) or that this process
        never sent; one still waiting for the broker's acknowledgement paho sends again itself.
        Otherwise: each one sent `resend_interval` seconds ago or more.
        """
        now = time.monotonic()
        with self._lock:
            in_flight = dict(self._in_flight)
        for result in self.journal.pending_results():
            sent = in_flight.get(result["id"])
            if sent is not None:
                info, sent_at = sent
                due = _acknowledged(info) if after_reconnect else now - sent_at >= self.resend_interval
                if not due:
                    continue
            log.info("command=%s resending its %s result", result["id"], result["state"])
            self._publish(result, None, kept=True)


def _acknowledged(info) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # published while disconnected: paho sends it on reconnect
        return False


def _timeout_error(timeout: float) -> str:
    return (f"still running after its timeout of {timeout:g} s; the agent stopped waiting "
            "(the command may still complete in the background, its result is not reported)")
