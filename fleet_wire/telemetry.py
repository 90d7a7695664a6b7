"""Telemetry batches (device → server) and the readings inside them."""
from __future__ import annotations

import json
import math
import re

from marshmallow import ValidationError, fields, validate

from .messages import Message
from .protocol import PROTOCOL_VERSION, WireError

GEO_POINT = "geo_point"
NUMERIC_TYPES = ("int", "long", "float", "double")
INTEGER_TYPES = ("int", "long")
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
TELEMETRY_TYPES = NUMERIC_TYPES + (GEO_POINT,)
MAX_BATCH_READINGS = 5000
FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")


_MAX_TS = 32503680000.0  # year 3000: a bigger timestamp is a unit mistake (ms or µs sent as s)
_READING_KEYS = frozenset(("field", "type", "ts", "value"))


def check_reading(item, ignore_unknown: bool = False) -> dict:
    """One reading `{field, type, ts, value}` checked and normalised, or ValidationError naming each bad key.

    Keys it does not know are an error unless `ignore_unknown` (as on the wire, where a newer
    agent may send more).

    `value` is a finite number (a whole one within signed 64 bits for int/long), or `{lat, lon}` for geo_point;
    `ts` is epoch seconds (UTC) with microsecond resolution. Written by hand rather than as a
    nested marshmallow schema because batches carry thousands of readings and marshmallow
    costs ~75 µs per reading, which alone would cap a worker near 13,000 readings/s.
    """
    if not isinstance(item, dict):
        raise ValidationError("a reading is an object {field, type, ts, value}")
    errors = {}
    for key in () if ignore_unknown else item.keys() - _READING_KEYS:
        errors[key] = ["Unknown field."]
    for key in _READING_KEYS - item.keys():
        errors[key] = ["Missing data for required field."]
    field, kind, ts, value = item.get("field"), item.get("type"), item.get("ts"), item.get("value")
    if "field" in item and not (isinstance(field, str) and FIELD_NAME.match(field)):
        errors["field"] = ["1 to 200 characters: letters, digits and _ . : - (not first)"]
    if "type" in item and kind not in TELEMETRY_TYPES:
        errors["type"] = [f"one of {', '.join(TELEMETRY_TYPES)}"]
    if "ts" in item and not (_is_number(ts) and 0 <= ts < _MAX_TS):
        errors["ts"] = ["epoch seconds (UTC) between 1970 and 3000"]
    if "value" in item and kind in TELEMETRY_TYPES:
        problem, value = _check_value(kind, value)
        if problem:
            errors["value"] = [problem]
    if errors:
        raise ValidationError(errors)
    return {"field": field, "type": kind, "ts": float(ts), "value": value}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(kind, value):
    """(problem, normalised value): problem is None when the value fits the type."""
    if kind == GEO_POINT:
        if not (isinstance(value, dict) and value.keys() == {"lat", "lon"}):
            return "a geo_point value is an object {lat, lon}", None
        lat, lon = value["lat"], value["lon"]
        if not (_is_number(lat) and -90 <= lat <= 90 and _is_number(lon) and -180 <= lon <= 180):
            return "lat must be a number in [-90, 90] and lon in [-180, 180]", None
        return None, {"lat": float(lat), "lon": float(lon)}
    if not _is_number(value):
        return f"a {kind} value is a finite number", None
    if kind in INTEGER_TYPES:
        if value != int(value):
            return f"a {kind} value is a whole number", None
        if not INT64_MIN <= value <= INT64_MAX:
            # Bigger whole numbers overflow what the server's aggregates can answer.
            return f"a {kind} value fits a signed 64-bit integer ({INT64_MIN} to {INT64_MAX})", None
        return None, int(value)
    return None, float(value)


class ReadingList(fields.Field):
    """A list of readings, each checked by `check_reading`; errors are keyed by position."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("a list of readings")
        if not 1 <= len(value) <= MAX_BATCH_READINGS:
            raise ValidationError(f"between 1 and {MAX_BATCH_READINGS} readings")
        readings, errors = [], {}
        for position, item in enumerate(value):
            try:
                readings.append(check_reading(item, ignore_unknown=True))
            except ValidationError as exc:
                errors[position] = exc.messages
                if len(errors) >= 10:
                    break  # enough to say what is wrong
        if errors:
            raise ValidationError(errors)
        return readings

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class TelemetryBatchSchema(Message):
    """device → server: readings the device buffered, sent once per `batch_id`.

    `dropped` counts the readings the device's full buffer has discarded since it was created.
    """

    batch_id = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{32}$"))
    dropped = fields.Integer(load_default=0, validate=validate.Range(min=0))
    readings = ReadingList(required=True)


telemetry_batch = TelemetryBatchSchema()


def telemetry_payload(batch_id: str, dropped: int, readings_json: list[str]) -> bytes:
    """A telemetry batch assembled from readings already checked by `check_reading` and stored as JSON.

    The device buffers readings as JSON text; joining them avoids decoding and checking each
    one a second time on every (re)send.
    """
    if not readings_json or len(readings_json) > MAX_BATCH_READINGS:
        raise WireError(f"a batch holds 1 to {MAX_BATCH_READINGS} readings, not {len(readings_json)}")
    head = json.dumps({"v": PROTOCOL_VERSION, "batch_id": batch_id, "dropped": int(dropped)}, separators=(",", ":"))
    return f'{head[:-1]},"readings":[{",".join(readings_json)}]}}'.encode()
