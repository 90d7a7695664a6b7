"""Device telemetry: readings from sources, buffered on disk, published in batches that are sent once.

Readings come from programs on the device (the local API's `POST /logbook/`) and from
built-in sources that read real system data (uptime, CPU temperature, any numeric file
such as a sysfs voltage, gpsd positions). They wait in an SQLite file in the state
directory until the server has stored them, so a device that is offline keeps them, up to a
bound past which the oldest are dropped and counted.

A batch gets its id when it is formed and is stored, id and bytes, until the server's
confirmation names it (the broker's acknowledgement is not enough: a broker that restarts can
acknowledge a batch and drop it). One batch is in flight at a time; it is sent again with the
same id after a reconnect, a restart, or `confirm_timeout` seconds without a confirmation, and
the server stores each (device, batch id) once: nothing is stored twice. While batches wait,
readings wait in the buffer, where the bound applies.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgspec

import fleet_wire as wire
from .state import create_private_file, private_directory

log = logging.getLogger(__name__)

_BATCH_ID = re.compile(r"^[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class Batch:
    batch_id: str
    payload: bytes
    readings: int


class TelemetryBuffer:
    """Readings waiting to be sent and the batch in flight, in one SQLite file.

    Readings are numbered in arrival order and only ever removed from the oldest end (to form
    a batch or to make room), so the waiting ones are always one contiguous run of numbers.
    """

    def __init__(self, path: Path, capacity: int = 100_000, batch_size: int = 500):
        if capacity < 1 or not 1 <= batch_size <= wire.MAX_BATCH_READINGS:
            raise ValueError(f"capacity must be ≥ 1 and batch size 1..{wire.MAX_BATCH_READINGS}")
        self.capacity = capacity
        self.batch_size = batch_size
        private_directory(path.parent)
        # SQLite gives new -wal and -shm files the database file's mode; ones an older agent left are tightened.
        create_private_file(path)
        for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if companion.exists():
                companion.chmod(0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # WAL + FULL: a reading acknowledged to its producer is on disk, and a power loss
        # leaves the file consistent.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS reading (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS batch (batch_id TEXT PRIMARY KEY, payload BLOB NOT NULL,"
                             " readings INTEGER NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO counter VALUES ('dropped', 0)")

    def _transaction(self):
        return _Transaction(self._db)

    def add(self, readings: list[wire.Reading]) -> int:
        """Store checked readings; returns how many old ones were dropped to stay within capacity."""
        if not readings:
            return 0
        bodies = [(msgspec.json.encode(r).decode(),) for r in readings]
        with self._lock, self._transaction():
            self._db.executemany("INSERT INTO reading (body) VALUES (?)", bodies)
            oldest, newest = self._db.execute("SELECT min(seq), max(seq) FROM reading").fetchone()
            excess = newest - oldest + 1 - self.capacity
            if excess > 0:
                self._db.execute("DELETE FROM reading WHERE seq < ?", (oldest + excess,))
                self._db.execute("UPDATE counter SET value = value + ? WHERE name = 'dropped'", (excess,))
                log.warning("telemetry buffer full (%d readings): dropped the %d oldest", self.capacity, excess)
        return max(excess, 0)

    def next_batch(self) -> Batch | None:
        """The batch in flight, or a new one formed from the oldest readings; None when nothing waits."""
        with self._lock:
            row = self._db.execute("SELECT batch_id, payload, readings FROM batch ORDER BY rowid LIMIT 1").fetchone()
            if row is not None:
                return Batch(row[0], bytes(row[1]), row[2])
            with self._transaction():
                rows = self._db.execute("SELECT seq, body FROM reading ORDER BY seq LIMIT ?",
                                        (self.batch_size,)).fetchall()
                if not rows:
                    return None
                batch_id = uuid.uuid4().hex
                readings = [_STORED_READING.decode(body) for _, body in rows]
                payload = wire.encode(wire.TelemetryBatch(batch_id=batch_id, dropped=self.dropped_locked(),
                                                          readings=readings))
                self._db.execute("DELETE FROM reading WHERE seq <= ?", (rows[-1][0],))
                self._db.execute("INSERT INTO batch VALUES (?, ?, ?)", (batch_id, payload, len(rows)))
            return Batch(batch_id, payload, len(rows))

    def mark_stored(self, batch_ids) -> int:
        """The server stored these batches (or refused them for good): forget them. How many were here."""
        batch_ids = [(batch_id,) for batch_id in batch_ids if isinstance(batch_id, str)]
        if not batch_ids:
            return 0
        with self._lock, self._transaction():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM batch WHERE batch_id = ?", batch_ids)
            return self._db.total_changes - before

    def in_flight(self) -> str | None:
        """The id of the batch waiting for the server's confirmation, if any."""
        with self._lock:
            row = self._db.execute("SELECT batch_id FROM batch ORDER BY rowid LIMIT 1").fetchone()
            return row[0] if row else None

    def dropped_locked(self) -> int:
        return self._db.execute("SELECT value FROM counter WHERE name = 'dropped'").fetchone()[0]

    def stats(self) -> dict:
        with self._lock:
            oldest, newest = self._db.execute("SELECT min(seq), max(seq) FROM reading").fetchone()
            in_flight = self._db.execute("SELECT coalesce(sum(readings), 0) FROM batch").fetchone()[0]
            return {
                "waiting": 0 if oldest is None else newest - oldest + 1,
                "in_flight": in_flight,
                "dropped": self.dropped_locked(),
                "capacity": self.capacity,
            }

    def close(self):
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, connection):
        self.connection = connection

    def __enter__(self):
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self.connection.execute("ROLLBACK" if kind else "COMMIT")


# What the buffer holds: readings already checked, so read back as they were written.
_STORED_READING = msgspec.json.Decoder(wire.Reading)


# --- readings -----------------------------------------------------------------

def reading_from_request(item, now: float | None = None) -> wire.Reading:
    """A reading posted to the local API, with `ts` (ISO 8601 or epoch seconds) defaulting to now.

    Raises wire.WireError naming the key that is wrong.
    """
    if not isinstance(item, dict):
        raise wire.WireError("a reading is an object {field, type, value, ts?}")
    item = dict(item)
    ts = item.get("ts")
    if ts is None:
        item["ts"] = time.time() if now is None else now
    elif isinstance(ts, str):
        try:
            moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            raise wire.WireError(f"ts: {ts!r} is not an ISO 8601 date-time") from None
        item["ts"] = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    unknown = sorted(item.keys() - set(wire.Reading.__struct_fields__))
    if unknown:  # a typo here would otherwise go unnoticed (the wire ignores fields it does not know)
        raise wire.WireError(f"{unknown[0]}: unknown field")
    return wire.from_builtins(wire.Reading, item)


# --- built-in sources -------------------------------------------------------------

class SourceUnavailable(Exception):
    """A source cannot read on this device (no such file, not a number)."""


@dataclass(frozen=True)
class FileSource:
    """A number read from a file (sysfs, procfs, anything), times `scale`: e.g. a battery voltage."""

    field: str
    path: Path
    scale: float = 1.0
    kind: str = "double"

    def read(self) -> dict:
        try:
            text = self.path.read_text().split()
        except OSError as exc:
            raise SourceUnavailable(f"{self.path}: {exc.strerror or exc}") from None
        try:
            number = float(text[0]) * self.scale
        except (IndexError, ValueError):
            raise SourceUnavailable(f"{self.path} does not start with a number") from None
        return {"field": self.field, "type": self.kind, "ts": time.time(), "value": number}


def uptime_source(proc: Path = Path("/proc/uptime")) -> FileSource:
    return FileSource("sys.uptime", proc)


def cpu_temperature_source(sysfs: Path = Path("/sys/class/thermal/thermal_zone0/temp")) -> FileSource:
    # The kernel reports millidegrees Celsius.
    return FileSource("sys.cpu.temp", sysfs, scale=0.001)


BUILTIN_SOURCES = {"uptime": uptime_source, "cpu_temp": cpu_temperature_source}


def parse_file_source(text: str) -> FileSource:
    """`FIELD=PATH` or `FIELD=PATH*SCALE` (e.g. `obd.bat.voltage=/sys/.../voltage_now*0.000001`)."""
    field, sep, rest = text.partition("=")
    if not sep or not wire.FIELD_NAME.match(field) or not rest:
        raise ValueError(f"{text!r}: expected FIELD=PATH or FIELD=PATH*SCALE")
    path, star, scale = rest.rpartition("*") if "*" in rest else (rest, "", "1")
    try:
        factor = float(scale)
    except ValueError:
        raise ValueError(f"{text!r}: the scale {scale!r} is not a number") from None
    return FileSource(field, Path(path), factor)


def position_from_gpsd(line: bytes | str) -> dict | None:
    """A `track.pos.loc` reading from one gpsd JSON report, or None when it carries no 2D fix."""
    try:
        report = json.loads(line)
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("class") != "TPV" or (report.get("mode") or 0) < 2:
        return None
    lat, lon = report.get("lat"), report.get("lon")
    ts = time.time()
    if isinstance(report.get("time"), str):
        try:
            ts = datetime.fromisoformat(report["time"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    try:
        return wire.from_builtins(wire.Reading, {"field": "track.pos.loc", "type": wire.GEO_POINT, "ts": ts,
                                                 "value": {"lat": lat, "lon": lon}})
    except wire.WireError:
        return None


# --- the running parts -----------------------------------------------------------------

@dataclass
class TelemetryConfig:
    interval: float = 60.0
    sources: tuple = ("uptime", "cpu_temp")
    files: tuple = ()  # FileSource
    gpsd: tuple | None = None  # (host, port)
    capacity: int = 100_000
    batch_size: int = 500
    ack_timeout: float = 60.0
    # A batch the server has not confirmed this many seconds after the broker took it is sent again.
    confirm_timeout: float = 30.0


class Telemetry:
    """Owns the buffer and the threads that fill it (sources) and drain it (the batch publisher)."""

    def __init__(self, unit_id: str, state_dir: Path, client, connected: threading.Event,
                 config: TelemetryConfig | None = None):
        self.config = config or TelemetryConfig()
        self.topic = wire.device_topic(unit_id, "telemetry")
        self.client = client
        self.connected = connected
        self.buffer = TelemetryBuffer(Path(state_dir) / "telemetry.db", self.config.capacity, self.config.batch_size)
        self.sources = [BUILTIN_SOURCES[name]() for name in self.config.sources] + list(self.config.files)
        self.stopping = threading.Event()
        self.waiting = threading.Event()
        self.confirmed = threading.Event()  # set when a confirmation arrives or the link came back
        self.reconnects = 0
        self.sent_batches = self.resent_batches = self.source_failures = 0
        self._threads: list[threading.Thread] = []

    def add(self, readings: list[wire.Reading]) -> int:
        dropped = self.buffer.add(readings)
        self.waiting.set()
        return dropped

    def start(self):
        targets = [("telemetry-publisher", self._publish_forever)]
        if self.sources:
            targets.append(("telemetry-sources", self._sample_forever))
        if self.config.gpsd:
            targets.append(("telemetry-gpsd", self._follow_gpsd))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self):
        self.stopping.set()
        self.waiting.set()
        for thread in self._threads:
            thread.join(5)
        self.buffer.close()

    # --- sources -----------------------------------------------------------

    def sample(self) -> list[wire.Reading]:
        """Read every built-in source once; an unavailable source is logged and skipped."""
        readings = []
        for source in self.sources:
            try:
                readings.append(wire.from_builtins(wire.Reading, source.read()))
            except (SourceUnavailable, wire.WireError) as exc:
                self.source_failures += 1
                log.debug("telemetry source %s unavailable: %s", source.field, exc)
        return readings

    def _sample_forever(self):
        unavailable = {s.field for s in self.sources if _unavailable(s)}
        if unavailable:
            log.info("telemetry sources not available on this device: %s", ", ".join(sorted(unavailable)))
        while not self.stopping.is_set():
            try:
                self.add(self.sample())
            except Exception:  # a full disk, a bug: sampling goes on next time
                log.exception("telemetry sampling failed")
            self.stopping.wait(self.config.interval)

    def _follow_gpsd(self):
        host, port = self.config.gpsd
        last = 0.0
        while not self.stopping.is_set():
            try:
                with socket.create_connection((host, port), timeout=10) as sock:
                    sock.sendall(b'?WATCH={"enable":true,"json":true}\n')
                    log.info("following gpsd at %s:%s", host, port)
                    for line in sock.makefile("rb"):
                        if self.stopping.is_set():
                            return
                        reading = position_from_gpsd(line)
                        # gpsd reports about once a second; keep at most one position per interval.
                        if reading is not None and reading["ts"] - last >= min(self.config.interval, 1.0):
                            self.add([reading])
                            last = reading["ts"]
            except OSError as exc:
                log.debug("gpsd at %s:%s not answering: %s", host, port, exc)
            self.stopping.wait(10)

    # --- publishing ---------------------------------------------------------

    def confirm(self, ids) -> int:
        """The server's confirmation: forget the batches it names."""
        ids = [i for i in ids if isinstance(i, str) and _BATCH_ID.match(i)]
        if not ids:  # a confirmation of other reports only: spare the database
            return 0
        try:
            stored = self.buffer.mark_stored(ids)
        except sqlite3.Error:
            log.exception("cannot forget confirmed telemetry batches; they are sent again")
            return 0
        if stored:
            self.sent_batches += stored
            self.confirmed.set()
        return stored

    def reconnected(self):
        """The link came back: what waited for a confirmation may have been lost with the broker."""
        self.reconnects += 1
        self.confirmed.set()

    def _publish_forever(self):
        last_sent = None
        while not self.stopping.is_set():
            if not self.connected.wait(0.5):
                continue
            try:
                batch = self.buffer.next_batch()
            except (sqlite3.Error, wire.WireError):
                log.exception("cannot form a telemetry batch")
                self.stopping.wait(5)
                continue
            if batch is None:
                self.waiting.wait(1.0)
                self.waiting.clear()
                continue
            if batch.batch_id == last_sent:
                self.resent_batches += 1
                log.info("telemetry batch %s not confirmed by the server; sending it again", batch.batch_id)
            reconnects = self.reconnects
            self.confirmed.clear()
            if not self._send(batch):
                continue
            last_sent = batch.batch_id
            if self._await_confirmation(batch.batch_id, reconnects):
                log.debug("telemetry batch %s stored readings=%d", batch.batch_id, batch.readings)

    def _await_confirmation(self, batch_id: str, reconnects: int) -> bool:
        """Wait until the server confirms the batch; False after a reconnect, a stop or `confirm_timeout`."""
        deadline = time.monotonic() + self.config.confirm_timeout
        while not self.stopping.is_set() and self.reconnects == reconnects:
            if self.buffer.in_flight() != batch_id:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.confirmed.wait(min(left, 1.0))
            self.confirmed.clear()
        return False

    def _send(self, batch: Batch) -> bool:
        """Publish at QoS 1 and wait for the broker's acknowledgement.

        paho re-sends an unacknowledged message itself after a reconnect; if the wait still
        runs out, the caller sends the batch again under the same id and the server drops the copy.
        """
        info = self.client.publish(self.topic, batch.payload, qos=1)
        deadline = time.monotonic() + self.config.ack_timeout
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                info.wait_for_publish(0.5)
            except (RuntimeError, ValueError) as exc:
                log.info("telemetry batch %s not accepted by paho (%s); will resend", batch.batch_id, exc)
                self.stopping.wait(1)
                return False
            if info.is_published():
                return True
        return False

    def stats(self) -> dict:
        return {**self.buffer.stats(), "sent_batches": self.sent_batches, "resent_batches": self.resent_batches,
                "source_failures": self.source_failures}


def _unavailable(source) -> bool:
    try:
        source.read()
        return False
    except SourceUnavailable:
        return True
