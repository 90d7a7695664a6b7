"""Storing telemetry batches and reading series back, raw or aggregated in the database."""
import json
import logging
import math
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from sqlalchemy import Numeric, cast, func, insert, text
from sqlalchemy.exc import DBAPIError

import fleet_wire as wire
from fleet_wire import GEO_POINT, INTEGER_TYPES

from ..errors import ValidationError
from ..extensions import db
from ..models import Device
from .models import TelemetryBatch, TelemetryReading
from .schemas import interval_microseconds

log = logging.getLogger(__name__)

MAX_RAW_READINGS = 100_000
_EPOCH = datetime(1970, 1, 1)
_AGGREGATES = {"avg": func.avg, "min": func.min, "max": func.max, "sum": func.sum}
NUMERIC_OUT_OF_RANGE = "22003"  # PostgreSQL's SQLSTATE for a double that overflows


def record_telemetry(device, batch: wire.TelemetryBatch) -> bool:
    """Add a batch's readings to the caller's transaction; False when the batch was stored before."""
    seen = db.session.scalar(
        db.select(TelemetryBatch.id).filter_by(device_id=device.id, batch_id=batch.batch_id)
    )
    if seen is not None:
        log.info("duplicate telemetry batch device=%s batch=%s ignored", device.id, batch.batch_id)
        return False
    readings = batch.readings
    db.session.add(TelemetryBatch(device_id=device.id, batch_id=batch.batch_id, readings=len(readings),
                                  dropped=batch.dropped))
    if batch.dropped:
        log.warning("device=%s reports %d telemetry readings dropped by its full buffer", device.id, batch.dropped)
    rows = [reading_row(device.id, reading) for reading in readings]
    connection = db.session.connection()
    if connection.dialect.name == "postgresql":
        _copy_rows(connection, rows)
    else:
        # One executemany: SQLAlchemy batches the rows into multi-row INSERTs.
        connection.execute(insert(TelemetryReading), [dict(zip(READING_COLUMNS, row)) for row in rows])
    return True


READING_COLUMNS = ("device_id", "field", "field_type", "ts_us", "value", "lat", "lon", "entry_json")
_COPY_READINGS = f"COPY telemetry_reading ({', '.join(READING_COLUMNS)}) FROM STDIN"


def reading_row(device_id: str, reading: wire.Reading) -> tuple:
    """A reading as a row of READING_COLUMNS, with its entry of a raw read rendered (see models.py).

    Values go in as floats: the column is a double (a raw read has always returned `5.0` for an
    int 5), and SQLite's driver refuses a Python int beyond 64 bits.
    """
    ts_us = round(reading.ts * 1_000_000)
    ts = _iso(ts_us, "microseconds")
    if reading.type == GEO_POINT:
        lat, lon = reading.value.lat, reading.value.lon
        entry = f'{{"ts":"{ts}","location":{{"lat":{lat!r},"lon":{lon!r}}}}}'
        return device_id, reading.field, GEO_POINT, ts_us, None, lat, lon, entry
    value = float(reading.value)
    return device_id, reading.field, reading.type, ts_us, value, None, None, f'{{"ts":"{ts}","value":{value!r}}}'


def _copy_rows(connection, rows: list[tuple]):
    """COPY the rows on the session's own connection, so they commit (or roll back) with its transaction.

    A multi-row INSERT makes PostgreSQL parse and plan thousands of parameters per batch; COPY
    streams the rows, which is what lets one worker keep up with thousands of readings a second.
    """
    with connection.connection.driver_connection.cursor() as cursor, cursor.copy(_COPY_READINGS) as copy:
        for row in rows:
            copy.write_row(row)


def _epoch_us(moment: datetime) -> int:
    return (moment.replace(tzinfo=None) - _EPOCH) // timedelta(microseconds=1)


_DAY_US = 86_400_000_000


@lru_cache(maxsize=4096)
def _day_prefix(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")


def _iso(ts_us: int, timespec: str) -> str:
    """`2020-07-09T10:11:53.811839Z` (or `.811Z` for milliseconds) from epoch microseconds.

    Arithmetic on a cached date prefix: every stored reading and aggregated bucket needs one,
    and building a datetime for each costs more than the rest of its work.
    """
    day, rest = divmod(ts_us, _DAY_US)
    prefix = _day_prefix(day)
    seconds, micros = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if timespec == "milliseconds":
        return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{micros // 1000:03d}Z"
    return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}Z"


def read_series_json(args: dict) -> str:
    """The readings of one field of one device in [from_utc, to_utc) as the JSON text AutoPi's logbook returns."""
    start, end = _epoch_us(args["from_utc"]), _epoch_us(args["to_utc"])
    if args["aggregation"]:
        reading = TelemetryReading.__table__.c
        series = (
            reading.device_id == args["device_id"],
            reading.field == args["field"],
            reading.field_type == args["field_type"],
            reading.ts_us >= start,
            reading.ts_us < end,
        )
        entries = _aggregated(series, start, args)
        found = bool(entries)
        answer = json.dumps(entries, separators=(",", ":"))
    else:
        found, answer = _raw_json(args, start, end)
    # Readings are deleted with their device, so only an empty answer needs to ask whether the
    # device exists: a found series saves the request that query.
    if not found and db.session.get(Device, args["device_id"]) is None:
        raise ValidationError("device_id", f"no device has id {args['device_id']!r}")
    return answer


# A raw read is thousands of entries. Each was rendered at ingest (entry_json): the database
# only joins them, so neither it nor Python formats a timestamp or a double per entry.
_RAW_SERIES = """
    FROM telemetry_reading
    WHERE device_id = :device_id AND field = :field AND field_type = :field_type
      AND ts_us >= :start AND ts_us < :end
"""
RAW_READ_SQL = {
    # group_concat keeps the order of the subquery's rows, which the index gives without a sort.
    "sqlite": f"SELECT count(*), group_concat(entry_json, ',') FROM (SELECT entry_json {_RAW_SERIES}"
              " ORDER BY ts_us LIMIT :limit)",
    # The rows themselves, in the index's order: PostgreSQL (15) sorts the input of
    # `string_agg(... ORDER BY ts_us)` even when it arrives sorted, which cost more than
    # joining the strings here. The LIMIT only tells a range too big to return.
    "postgresql": f"SELECT entry_json {_RAW_SERIES} ORDER BY ts_us LIMIT :limit",
}
# Built once, like every statement on a hot path.
_RAW_READ_JOINED = text(RAW_READ_SQL["sqlite"])
_RAW_READ_ROWS = text(RAW_READ_SQL["postgresql"])


def _raw_json(args: dict, start: int, end: int) -> tuple[bool, str]:
    """Whether the range holds any reading, and its entries as a JSON array."""
    connection = db.session.connection()
    parameters = {"device_id": args["device_id"], "field": args["field"], "field_type": args["field_type"],
                  "start": start, "end": end, "limit": MAX_RAW_READINGS + 1}
    if connection.dialect.name == "postgresql":
        rows = connection.execute(_RAW_READ_ROWS, parameters).all()
        count, entries = len(rows), ",".join([entry for entry, in rows])
    else:
        count, entries = connection.execute(_RAW_READ_JOINED, parameters).one()
    if count > MAX_RAW_READINGS:
        raise ValidationError(
            "to_utc", f"the range holds more than {MAX_RAW_READINGS} readings: narrow it or aggregate with an interval"
        )
    return count > 0, f"[{entries or ''}]"


def _aggregated(series, start: int, args: dict) -> list[dict]:
    try:
        rows = _aggregate_rows(series, start, args, exact=False)
    except DBAPIError as exc:
        # PostgreSQL refuses a double sum or average that overflows (SQLite answers Infinity):
        # read again summing in numeric, which has no such limit, and let _entry say null.
        if getattr(exc.orig, "sqlstate", None) != NUMERIC_OUT_OF_RANGE:
            raise
        db.session.rollback()
        rows = _aggregate_rows(series, start, args, exact=True)
    if args["aggregation"] in ("sum", "avg"):
        rows = [(first, last, value if _finite(value) else _exact_sum(series, first, last, args["aggregation"]))
                for first, last, value in rows]
    whole = args["field_type"] in INTEGER_TYPES and args["aggregation"] != "avg"
    return [_entry(first, last, value, whole, args) for first, last, value in rows]


def _aggregate_rows(series, start: int, args: dict, exact: bool):
    reading = TelemetryReading.__table__.c
    width = interval_microseconds(args["interval"])
    value = cast(reading.value, Numeric) if exact else reading.value
    # Buckets count from from_utc. The bucket number is computed in a subquery so the outer
    # GROUP BY names a column: PostgreSQL does not match two copies of an expression that
    # carries bound parameters.
    inner = (
        db.select(((reading.ts_us - start) // width).label("bucket"), reading.ts_us, value.label("value"))
        .where(*series)
        .subquery()
    )
    statement = (
        db.select(func.min(inner.c.ts_us), func.max(inner.c.ts_us), _AGGREGATES[args["aggregation"]](inner.c.value))
        .group_by(inner.c.bucket)
        .order_by(inner.c.bucket)
    )
    return db.session.connection().execute(statement).all()


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _exact_sum(series, first: int, last: int, aggregation: str) -> Decimal:
    """SQLite sums in doubles, overflowing to Infinity: one bucket's readings (first to last) summed exactly.

    Only after an overflow, which honest readings do not reach; _entry then says whether the
    exact result fits.
    """
    reading = TelemetryReading.__table__.c
    statement = db.select(reading.value).where(*series, reading.ts_us >= first, reading.ts_us <= last)
    values = [Decimal(value) for value, in db.session.connection().execute(statement)]
    total = sum(values, Decimal(0))
    return total / len(values) if aggregation == "avg" and values else total


def _entry(first: int, last: int, value, whole: bool, args: dict) -> dict:
    """One bucket `{ts, max_ts, value}`; a value its type cannot hold is null, with a note saying why."""
    entry = {"ts": _iso(first, "milliseconds"), "max_ts": last // 1000}
    value = None if value is None else float(value)
    # Inclusive of 2**63: the column is a double, where the largest long reading is stored as 2**63.
    if value is None or not math.isfinite(value) or (whole and not -2.0 ** 63 <= value <= 2.0 ** 63):
        entry["value"] = None
        entry["note"] = (f"overflow: the {args['aggregation']} does not fit a {args['field_type']}"
                         f" ({'a signed 64-bit integer' if whole else 'a finite double'})")
        return entry
    entry["value"] = int(value) if whole else value
    return entry
