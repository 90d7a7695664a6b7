"""The command journal: which commands were accepted, and their results until the server confirmed them.

The journal (`<state_dir>/commands/journal.log`) is an append-only file of JSON lines:

    {"accepted": ID}     fsynced before the command runs (and before the message is acknowledged),
    {"result": {...}}    fsynced before the result is published,
    {"acked": ID}        once the server's confirmation named the result (not fsynced: losing
                         it only means the result is sent once more, and the server ignores
                         repeats).

A read-only command (`read_only` in the command table: test.ping, docker.ps, ...) is written
without the two fsyncs: running one twice does no harm, so a power loss may at worst make
it run again when the server asks, or report it failed as interrupted. That keeps a ping's
round trip free of disk flushes; everything that changes the device pays for them.

Replaying it at start-up gives the ids already accepted (never run again), the results still
to send (sent on every connect), the most recent results (a command delivered again gets its
result again: the server asks when a result it was acknowledged got lost on the way), and the
ids accepted that never got a result: the agent stopped while they ran, so they are reported
failed. Past a bound it is rewritten atomically with only what is still needed.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
from pathlib import Path

from ..state import open_private_append, private_directory, write_atomically

log = logging.getLogger(__name__)


class CommandJournal:
    """Which command ids were accepted, and which results the broker has not acknowledged yet."""

    def __init__(self, directory: Path, remember: int = 2000, recent_results: int = 100):
        self.path = Path(directory) / "journal.log"
        private_directory(self.path.parent)
        self.remember = remember
        self.recent_results = recent_results
        self.recent: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.accepted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.unfinished: set[str] = set()
        self.unsent: dict[str, dict] = {}
        self._entries = 0
        self._compact_above = 3 * remember
        self._load()
        self._file = open_private_append(self.path)

    def _load(self):
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                self._apply(entry)
            except (ValueError, TypeError, KeyError, AttributeError):
                # A power loss can tear the last line; anything unreadable is skipped, not fatal.
                log.warning("skipping unreadable line %d of %s", number, self.path)
        self._entries = len(lines)

    def _apply(self, entry: dict):
        if "accepted" in entry:
            self._remember(str(entry["accepted"]))
            self.unfinished.add(str(entry["accepted"]))
        elif "result" in entry:
            result = entry["result"]
            self._remember(result["id"])
            self.unfinished.discard(result["id"])
            self.unsent[result["id"]] = result
            self.recent[result["id"]] = result
            self.recent.move_to_end(result["id"])
            while len(self.recent) > self.recent_results:
                self.recent.popitem(last=False)
        elif "acked" in entry:
            self.unsent.pop(entry["acked"], None)
        else:
            raise KeyError("no known entry")

    def _remember(self, command_id: str):
        self.accepted[command_id] = None
        self.accepted.move_to_end(command_id)
        while len(self.accepted) > self.remember:
            self.accepted.popitem(last=False)  # unfinished and unsent ids stay known through their own sets

    def _known(self, command_id: str) -> bool:
        return command_id in self.accepted or command_id in self.unfinished or command_id in self.unsent

    def seen(self, command_id: str) -> bool:
        with self._lock:
            return self._known(command_id)

    def accept(self, command_id: str, durable: bool = True) -> bool:
        """Record the id (on disk before returning when `durable`); False if it was accepted
        before (a duplicate delivery)."""
        with self._lock:
            if self._known(command_id):
                return False
            self._append({"accepted": command_id}, sync=durable)
            return True

    def record_result(self, result: dict, durable: bool = True):
        with self._lock:
            self._append({"result": result}, sync=durable)

    def acknowledge(self, command_id: str):
        with self._lock:
            if command_id in self.unsent:
                self._append({"acked": command_id}, sync=False)

    def pending_results(self) -> list[dict]:
        with self._lock:
            return list(self.unsent.values())

    def result(self, command_id: str) -> dict | None:
        """The final result of a recent command, sent or not."""
        with self._lock:
            return self.recent.get(command_id) or self.unsent.get(command_id)

    def _append(self, entry: dict, sync: bool):
        """Write an entry (durably when `sync`), then let it count. Call with the lock held."""
        self._file.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self._apply(entry)
        self._entries += 1
        if self._entries > self._compact_above:
            self._compact()

    def _compact(self):
        accepted = [*self.accepted, *(i for i in self.unfinished if i not in self.accepted)]
        kept = {**self.recent, **self.unsent}
        entries = [{"accepted": command_id} for command_id in accepted if command_id not in kept]
        for command_id, result in kept.items():
            entries.append({"result": result})
            if command_id not in self.unsent:
                entries.append({"acked": command_id})
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
        self._file.close()
        write_atomically(self.path, data)
        self._file = open_private_append(self.path)
        self._entries = len(entries)
        self._compact_above = max(3 * self.remember, 2 * len(entries))  # never compact on every append
        log.debug("compacted %s to %d entries", self.path, len(entries))

    def close(self):
        with self._lock:
            self._file.close()
