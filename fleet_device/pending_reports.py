"""Deployment reports and status the server has not confirmed yet: kept, and sent again until it has.

Each report gets an id (`rid`) and is written to `<state_dir>/reports/<number>-<rid>.json`
(atomically: write, fsync, rename) before it is first published. A confirmation naming the
id deletes the file. Until then the report goes out again after every reconnect and, while
connected, whenever `resend_interval` seconds passed since it last went: a broker that
restarts can acknowledge a report and drop it before any worker is subscribed again. The
server stores a report sent twice once (see docs/architecture.md, "Confirmations").

A report may take a `slot`: a newer report in the same slot replaces the older unconfirmed
one (only the latest status matters). Reports kept only in memory (`durable=False`) are for
what the agent says again anyway after a restart, such as its status.

At most `limit` reports are kept: past it the oldest is dropped, counted in `dropped` and
logged. A report dropped that way is one the server did not confirm for `limit` reports in
a row: a server older than confirmations, or one unreachable for a long time.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fleet_wire as wire
from .state import read_json, write_atomically

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 1000
DEFAULT_RESEND_INTERVAL = 30.0

# Topic kind → (message type, retained) of the reports kept here; each is kept as its fields (a dict).
KINDS = {
    "deployments": (wire.DeploymentReport, False),
    "status": (wire.Status, True),
}


def new_report_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class PendingReport:
    rid: str
    kind: str
    body: dict  # the payload's fields, `rid` included
    path: Path | None  # None: kept in memory only
    slot: str | None = None
    sent_at: float | None = None  # monotonic time of the last send by this process


class PendingReports:
    """The unconfirmed reports, oldest first, and their sending.

    `publish(kind, payload, retain)` hands one report to the MQTT client and must not block.
    """

    def __init__(self, directory: Path, publish: Callable[[str, bytes, bool], object], *,
                 limit: int = DEFAULT_LIMIT, resend_interval: float = DEFAULT_RESEND_INTERVAL):
        if limit < 1 or resend_interval <= 0:
            raise ValueError("limit must be ≥ 1 and resend_interval > 0")
        self.directory = Path(directory)
        self.publish = publish
        self.limit = limit
        self.resend_interval = resend_interval
        self.dropped = self.resent = 0
        self._lock = threading.Lock()
        self._reports: collections.OrderedDict[str, PendingReport] = collections.OrderedDict()
        self._next_number = 0
        self._load()

    def _load(self):
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            number, _, rid = path.stem.partition("-")
            stored = read_json(path)
            if not number.isdigit() or not isinstance(stored, dict) or stored.get("kind") not in KINDS \
                    or not isinstance(stored.get("body"), dict):
                log.warning("ignoring unreadable pending report %s", path)
                path.unlink(missing_ok=True)
                continue
            self._reports[rid] = PendingReport(rid, stored["kind"], stored["body"], path, stored.get("slot"))
            self._next_number = max(self._next_number, int(number) + 1)
        if self._reports:
            log.info("%d report(s) kept from before wait for the server's confirmation", len(self._reports))

    def send(self, kind: str, body: dict, *, slot: str | None = None, durable: bool = True):
        """Keep the report (on disk first when `durable`), then publish it; returns what `publish` returned.

        Raises wire.WireError if the report does not fit its schema; an OSError writing it is
        logged and the report is published all the same, once.
        """
        kind_of_message, retain = KINDS[kind]
        rid = new_report_id()
        body = {**body, "rid": rid}
        payload = wire.encode(wire.from_builtins(kind_of_message, body))
        report = PendingReport(rid, kind, body, None, slot)
        with self._lock:
            if durable:
                report.path = self.directory / f"{self._next_number:012d}-{rid}.json"
                self._next_number += 1
                try:
                    write_atomically(report.path, json.dumps({"kind": kind, "slot": slot, "body": body}).encode())
                except OSError as exc:
                    log.error("report %s cannot be kept on disk (%s); it is sent once, not kept", rid, exc)
                    report = None
            if report is not None:
                if slot is not None:
                    for older in [r for r in self._reports.values() if r.slot == slot]:
                        self._forget_locked(older)
                self._reports[rid] = report
                report.sent_at = time.monotonic()
                self._bound_locked()
        return self.publish(kind, payload, retain)

    def confirm(self, ids) -> int:
        """The server is done with these reports: forget them. Returns how many were pending."""
        with self._lock:
            found = [self._reports[rid] for rid in ids if rid in self._reports]
            for report in found:
                self._forget_locked(report)
        return len(found)

    def resend(self, reconnected_at: float | None = None) -> int:
        """Publish again the reports due; returns how many went.

        Due: each one last sent `resend_interval` seconds ago or more, and after a reconnect
        (`reconnected_at`, monotonic) each one not sent since, which the broker may have dropped.
        """
        now = time.monotonic()
        with self._lock:
            due = [r for r in self._reports.values()
                   if r.sent_at is None or now - r.sent_at >= self.resend_interval
                   or (reconnected_at is not None and r.sent_at < reconnected_at)]
            for report in due:
                report.sent_at = now
        for report in due:
            kind_of_message, retain = KINDS[report.kind]
            try:
                payload = wire.encode(wire.from_builtins(kind_of_message, report.body))
            except wire.WireError as exc:  # a file edited by hand, or an older contract: never sendable
                log.error("dropping pending report %s: %s", report.rid, exc)
                self.confirm([report.rid])
                continue
            self.publish(report.kind, payload, retain)
        if due:
            self.resent += len(due)
            log.info("resent %d report(s) the server has not confirmed", len(due))
        return len(due)

    def pending(self) -> list[PendingReport]:
        with self._lock:
            return list(self._reports.values())

    def __len__(self) -> int:
        return len(self._reports)

    def _forget_locked(self, report: PendingReport):
        self._reports.pop(report.rid, None)
        if report.path is not None:
            try:
                report.path.unlink(missing_ok=True)
            except OSError as exc:  # sent once more after a restart; the server stores it once
                log.warning("cannot remove confirmed report %s: %s", report.path, exc)

    def _bound_locked(self):
        while len(self._reports) > self.limit:
            oldest = next(iter(self._reports.values()))
            self._forget_locked(oldest)
            self.dropped += 1
            log.warning("%d reports wait for the server's confirmation: dropped the oldest (%s %s); "
                        "%d dropped so far", self.limit, oldest.kind, oldest.rid, self.dropped)
