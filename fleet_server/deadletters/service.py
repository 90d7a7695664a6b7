"""Recording dead letters (bounded, logged without flooding) and reading them back."""
import logging
import threading
import time
from typing import NamedTuple

from flask import current_app

import fleet_wire as wire

from ..extensions import db
from ..models import DeadLetter

log = logging.getLogger(__name__)

PAYLOAD_KEPT = 64 * 1024  # bytes of a payload kept: enough to see what a device sent, bounded per row
REASON_KEPT = 2000
TOPIC_KEPT = 300
LOG_WINDOW = 60.0  # seconds
LOG_LINES_PER_WINDOW = 100  # dead letters logged one by one per window; the rest are counted in a summary


class Letter(NamedTuple):
    """A report that could not be stored, and why."""

    topic: str
    payload: bytes
    reason: str


def storable_text(text: str, limit: int) -> str:
    """`text` as any database stores it: lone surrogates and NUL bytes escaped, at most `limit` characters."""
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return escaped if len(escaped) <= limit else escaped[:limit - 1] + "…"


def _row(letter: Letter) -> dict:
    try:
        where = wire.parse_topic(letter.topic)
        unit_id, kind = where.unit_id, where.kind
    except wire.WireError:
        unit_id = kind = None
    payload = bytes(letter.payload)
    return {"topic": storable_text(letter.topic, TOPIC_KEPT), "unit_id": unit_id, "kind": kind,
            "reason": storable_text(letter.reason, REASON_KEPT), "payload": payload[:PAYLOAD_KEPT],
            "payload_size": len(payload)}


_dead_letter = DeadLetter.__table__
# Everything but the newest `kept` rows: the table holds the latest dead letters, never more.
_PRUNE = _dead_letter.delete().where(_dead_letter.c.id <= db.select(_dead_letter.c.id).order_by(
    _dead_letter.c.id.desc()).limit(1).offset(db.bindparam("kept")).scalar_subquery())


def record(letters: list[Letter]) -> None:
    """Store `letters` in a transaction of their own, drop the oldest beyond FLEET_DEAD_LETTERS_KEPT, log them.

    A database error propagates with nothing committed.
    """
    if not letters:
        return
    connection = db.session.connection()
    connection.execute(_dead_letter.insert(), [_row(letter) for letter in letters])
    connection.execute(_PRUNE, {"kept": current_app.config["FLEET_DEAD_LETTERS_KEPT"]})
    db.session.commit()
    for letter in letters:
        _log.line(letter)


class RateLimitedLog:
    """A line per dead letter, up to `lines` per `window` seconds; past that a summary counts the rest.

    One device sending thousands of bad reports must not bury every other line of the log.
    """

    def __init__(self, lines: int = LOG_LINES_PER_WINDOW, window: float = LOG_WINDOW, clock=time.monotonic):
        self.lines, self.window, self.clock = lines, window, clock
        self.window_start = clock()
        self.logged = self.unlogged = 0
        self.lock = threading.Lock()

    def line(self, letter: Letter):
        with self.lock:
            now = self.clock()
            if now - self.window_start >= self.window:
                self._summarise(now)
                self.window_start, self.logged = now, 0
            if self.logged < self.lines:
                self.logged += 1
                log.warning("rejected device message, kept as a dead letter topic=%s reason=%s",
                            storable_text(letter.topic, TOPIC_KEPT), storable_text(letter.reason, REASON_KEPT))
                return
            self.unlogged += 1
            if self.unlogged % 1000 == 0:
                self._summarise(now)

    def _summarise(self, now: float):
        if self.unlogged:
            log.warning("dead letters: %d more in the last %.0f s not logged one by one "
                        "(GET /ingest/dead-letters/ lists them)", self.unlogged, now - self.window_start)
            self.unlogged = 0


_log = RateLimitedLog()


def letters_query(unit_id: str | None = None, kind: str | None = None):
    """The dead letters, newest first, optionally of one device or one kind of report."""
    statement = db.select(DeadLetter).order_by(DeadLetter.id.desc())
    if unit_id is not None:
        statement = statement.where(DeadLetter.unit_id == unit_id.lower())
    if kind is not None:
        statement = statement.where(DeadLetter.kind == kind)
    return statement


def get_letter(letter_id: int) -> DeadLetter | None:
    return db.session.get(DeadLetter, letter_id)
