"""Storing telemetry batches and reading series back, raw or aggregated in the database."""
import logging
from datetime import datetime, timedelta

from sqlalchemy import func, insert

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
    rows = []
    for reading in readings:
        row = {"device_id": device.id, "field": reading["field"], "field_type": reading["type"],
               "ts_us": round(reading["ts"] * 1_000_000), "value": None, "lat": None, "lon": None}
        if reading["type"] == GEO_POINT:
            row["lat"], row["lon"] = reading["value"]["lat"], reading["value"]["lon"]
        else:
            row["value"] = reading["value"]
        rows.append(row)
    # One executemany: SQLAlchemy batches the rows into multi-row INSERTs.
    db.session.execute(insert(TelemetryReading), rows)
    return True


def _epoch_us(moment: datetime) -> int:
    return (moment.replace(tzinfo=None) - _EPOCH) // timedelta(microseconds=1)


_DAY_US = 86_400_000_000
_day_prefixes: dict[int, str] = {}


def _iso(ts_us: int, timespec: str) -> str:
    """`2020-07-09T10:11:53.811839Z` (or `.811Z` for milliseconds) from epoch microseconds.

    Arithmetic on a cached date prefix: a day of raw readings is thousands of timestamps and
    building a datetime for each costs more than the query that fetched them.
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


def read_series(args: dict) -> list[dict]:
    """The readings of one field of one device in [from_utc, to_utc), as the seed's logbook returns them."""
    if db.session.get(Device, args["device_id"]) is None:
        raise ValidationError("device_id", f"no device has id {args['device_id']!r}")
    # The table's columns rather than the mapped class: Core rows cost a fraction of ORM loading
    # and a day of one device is thousands of them.
    reading = TelemetryReading.__table__.c
    start, end = _epoch_us(args["from_utc"]), _epoch_us(args["to_utc"])
    series = (
        reading.device_id == args["device_id"],
        reading.field == args["field"],
        reading.field_type == args["field_type"],
        reading.ts_us >= start,
        reading.ts_us < end,
    )
    if args["aggregation"]:
        return _aggregated(series, start, args)
    if args["field_type"] == GEO_POINT:
        rows = _raw(db.select(reading.ts_us, reading.lat, reading.lon), series)
        return [{"ts": _iso(ts, "microseconds"), "location": {"lat": lat, "lon": lon}} for ts, lat, lon in rows]
    rows = _raw(db.select(reading.ts_us, reading.value), series)
    return [{"ts": _iso(ts, "microseconds"), "value": value} for ts, value in rows]


def _raw(select, series):
    rows = db.session.connection().execute(
        select.where(*series).order_by(TelemetryReading.__table__.c.ts_us).limit(MAX_RAW_READINGS + 1)
    ).all()
    if len(rows) > MAX_RAW_READINGS:
        raise ValidationError(
            "to_utc", f"the range holds more than {MAX_RAW_READINGS} readings: narrow it or aggregate with an interval"
        )
    return rows


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
