"""Storing telemetry batches and reading series back, raw or aggregated in the database."""
import json
import logging
from datetime import datetime, timedelta

from sqlalchemy import func, insert, text

from fleet_device.wire import GEO_POINT, INTEGER_TYPES

from ..errors import ValidationError
from ..extensions import db
from ..models import Device
from .models import TelemetryBatch, TelemetryReading
from .schemas import interval_microseconds

log = logging.getLogger(__name__)

MAX_RAW_READINGS = 100_000
_EPOCH = datetime(1970, 1, 1)
_AGGREGATES = {"avg": func.avg, "min": func.min, "max": func.max, "sum": func.sum}


def record_telemetry(device: Device, batch: dict) -> bool:
    """Add a batch's readings to the caller's transaction; False when the batch was stored before."""
    seen = db.session.scalar(
        db.select(TelemetryBatch.id).filter_by(device_id=device.id, batch_id=batch["batch_id"])
    )
    if seen is not None:
        log.info("duplicate telemetry batch device=%s batch=%s ignored", device.id, batch["batch_id"])
        return False
    readings = batch["readings"]
    db.session.add(TelemetryBatch(device_id=device.id, batch_id=batch["batch_id"], readings=len(readings),
                                  dropped=batch["dropped"]))
    if batch["dropped"]:
        log.warning("device=%s reports %d telemetry readings dropped by its full buffer", device.id, batch["dropped"])
    rows = [_reading_row(device.id, reading) for reading in readings]
    connection = db.session.connection()
    if connection.dialect.name == "postgresql":
        _copy_rows(connection, rows)
    else:
        # One executemany: SQLAlchemy batches the rows into multi-row INSERTs.
        connection.execute(insert(TelemetryReading), [dict(zip(_READING_COLUMNS, row)) for row in rows])
    return True


_READING_COLUMNS = ("device_id", "field", "field_type", "ts_us", "value", "lat", "lon", "value_json")
_COPY_READINGS = f"COPY telemetry_reading ({', '.join(_READING_COLUMNS)}) FROM STDIN"


def _reading_row(device_id: str, reading: dict) -> tuple:
    """A reading as a row of _READING_COLUMNS. Values go in as floats: the column is a double, and
    SQLite's driver refuses a Python int beyond 64 bits."""
    ts_us = round(reading["ts"] * 1_000_000)
    if reading["type"] == GEO_POINT:
        lat, lon = float(reading["value"]["lat"]), float(reading["value"]["lon"])
        return (device_id, reading["field"], GEO_POINT, ts_us, None, lat, lon, f'{{"lat":{lat!r},"lon":{lon!r}}}')
    value = float(reading["value"])
    return device_id, reading["field"], reading["type"], ts_us, value, None, None, repr(value)


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
_day_prefixes: dict[int, str] = {}


def _iso(ts_us: int, timespec: str) -> str:
    """`2020-07-09T10:11:53.811Z` (milliseconds) or `.811839Z` (microseconds) from epoch microseconds.

    Arithmetic on a cached date prefix: building a datetime for each of up to 10,000 buckets
    costs more than the query that fetched them.
    """
    day, rest = divmod(ts_us, _DAY_US)
    prefix = _day_prefixes.get(day)
    if prefix is None:
        prefix = _day_prefixes[day] = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
    seconds, micros = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if timespec == "milliseconds":
        return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{micros // 1000:03d}Z"
    return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}Z"


def read_series_json(args: dict) -> str:
    """The readings of one field of one device in [from_utc, to_utc) as the JSON text the seed's logbook returns."""
    if db.session.get(Device, args["device_id"]) is None:
        raise ValidationError("device_id", f"no device has id {args['device_id']!r}")
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
        return json.dumps(_aggregated(series, start, args), separators=(",", ":"))
    return _raw_json(args, start, end)


# A raw read is thousands of entries: the database writes each one and joins them, so that
# Python only passes one string on. Each entry is `{"ts":"<ISO 8601 UTC, microseconds>",
# "value":<value_json>}` (`"location"` for geo_point); timestamps are cut from the integer
# ts_us, exact on both databases.
_RAW_SERIES = """
    FROM telemetry_reading
    WHERE device_id = :device_id AND field = :field AND field_type = :field_type
      AND ts_us >= :start AND ts_us < :end
    ORDER BY ts_us
    LIMIT :limit
"""
_RAW_JSON = {
    # group_concat keeps the order of the subquery's rows.
    "sqlite": f"""
        SELECT count(*), group_concat(entry, ',') FROM (
            SELECT printf(:entry, date(ts_us / 86400000000 * 86400, 'unixepoch'), ts_us / 3600000000 % 24,
                          ts_us / 60000000 % 60, ts_us / 1000000 % 60, ts_us % 1000000, value_json) AS entry
            {_RAW_SERIES})
    """,
    # Whole seconds and microseconds apart: interval arithmetic on a double loses microseconds
    # past 2255.
    "postgresql": f"""
        SELECT count(*), string_agg(format(:entry, to_char(
                   TIMESTAMP '1970-01-01' + ts_us / 1000000 * INTERVAL '1 second'
                   + ts_us % 1000000 * INTERVAL '1 microsecond', :ts_format), value_json), ',' ORDER BY ts_us)
        FROM (SELECT ts_us, value_json {_RAW_SERIES}) AS series
    """,
}
_RAW_ENTRY = {
    "sqlite": '{{"ts":"%sT%02d:%02d:%02d.%06dZ","{key}":%s}}',
    "postgresql": '{{"ts":"%s","{key}":%s}}',
}
_PG_TS_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


def _raw_json(args: dict, start: int, end: int) -> str:
    dialect = db.session.connection().dialect.name
    key = "location" if args["field_type"] == GEO_POINT else "value"
    count, entries = db.session.execute(text(_RAW_JSON[dialect]), {
        "device_id": args["device_id"], "field": args["field"], "field_type": args["field_type"],
        "start": start, "end": end, "limit": MAX_RAW_READINGS + 1,
        "entry": _RAW_ENTRY[dialect].format(key=key), "ts_format": _PG_TS_FORMAT,
    }).one()
    if count > MAX_RAW_READINGS:
        raise ValidationError(
            "to_utc", f"the range holds more than {MAX_RAW_READINGS} readings: narrow it or aggregate with an interval"
        )
    return f"[{entries or ''}]"


def _aggregated(series, start: int, args: dict) -> list[dict]:
    reading = TelemetryReading.__table__.c
    width = interval_microseconds(args["interval"])
    # Buckets count from from_utc. The bucket number is computed in a subquery so the outer
    # GROUP BY names a column: PostgreSQL does not match two copies of an expression that
    # carries bound parameters.
    inner = (
        db.select(((reading.ts_us - start) // width).label("bucket"), reading.ts_us, reading.value)
        .where(*series)
        .subquery()
    )
    statement = (
        db.select(func.min(inner.c.ts_us), func.max(inner.c.ts_us), _AGGREGATES[args["aggregation"]](inner.c.value))
        .group_by(inner.c.bucket)
        .order_by(inner.c.bucket)
    )
    whole = args["field_type"] in INTEGER_TYPES and args["aggregation"] != "avg"
    return [
        {"ts": _iso(first, "milliseconds"), "max_ts": last // 1000, "value": int(value) if whole else float(value)}
        for first, last, value in db.session.connection().execute(statement)
    ]
