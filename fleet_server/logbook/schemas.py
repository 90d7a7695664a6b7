"""Logbook payloads: the query of `GET /logbook/storage/read/` and the entries it returns."""
import re
from datetime import timezone

from marshmallow import ValidationError, fields, validate, validates_schema

from fleet_wire import FIELD_NAME, GEO_POINT, TELEMETRY_TYPES

from ..schemas import StrictSchema

AGGREGATIONS = ("avg", "min", "max", "sum")
MAX_BUCKETS = 10_000
INTERVAL = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_microseconds(text: str) -> int:
    number, unit = INTERVAL.match(text).groups()
    return int(number) * UNIT_SECONDS[unit] * 1_000_000


class StorageReadArgs(StrictSchema):
    device_id = fields.String(required=True, validate=validate.Length(min=1, max=36),
                              metadata={"description": "The device's id (not its unit_id)."})
    field = fields.String(required=True, validate=validate.Regexp(FIELD_NAME, error="not a field name"),
                          metadata={"description": "e.g. obd.bat.voltage or track.pos.loc"})
    field_type = fields.String(required=True, validate=validate.OneOf(TELEMETRY_TYPES))
    from_utc = fields.AwareDateTime(required=True, default_timezone=timezone.utc,
                                    metadata={"description": "ISO 8601; included."})
    to_utc = fields.AwareDateTime(required=True, default_timezone=timezone.utc,
                                  metadata={"description": "ISO 8601; excluded."})
    aggregation = fields.String(load_default=None, metadata={"description": "AVG, MIN, MAX or SUM, any case."})
    interval = fields.String(load_default=None, validate=validate.Regexp(
        INTERVAL, error="a whole number followed by s, m, h or d, e.g. 10s, 10m, 1h, 1d"),
        metadata={"description": "Bucket width, counted from from_utc."})

    @validates_schema(skip_on_field_errors=True)
    def _consistent(self, data, **kwargs):
        if data["from_utc"] > data["to_utc"]:
            raise ValidationError("must not be after to_utc", "from_utc")
        aggregation, interval = data["aggregation"], data["interval"]
        if aggregation is not None:
            aggregation = data["aggregation"] = aggregation.lower()
            if aggregation not in AGGREGATIONS:
                raise ValidationError(f"one of {', '.join(a.upper() for a in AGGREGATIONS)} (any case)", "aggregation")
            if data["field_type"] == GEO_POINT:
                raise ValidationError("geo_point fields cannot be aggregated", "aggregation")
            if interval is None:
                raise ValidationError("required with aggregation", "interval")
        elif interval is not None:
            raise ValidationError("required with interval", "aggregation")
        if interval is not None:
            span = (data["to_utc"] - data["from_utc"]) / (interval_microseconds(interval) / 1_000_000)
            if span.total_seconds() > MAX_BUCKETS:
                raise ValidationError(f"makes more than {MAX_BUCKETS} buckets between from_utc and to_utc", "interval")


class LocationSchema(StrictSchema):
    lat = fields.Float()
    lon = fields.Float()


class LogbookEntrySchema(StrictSchema):
    """One entry of a read: `{ts, location}` for geo_point, `{ts, value}` raw, `{ts, max_ts, value}` aggregated."""

    ts = fields.String(metadata={"description": "ISO 8601 UTC; for a bucket, its first reading."})
    max_ts = fields.Integer(metadata={"description": "Aggregated only: the bucket's last reading, epoch ms."})
    value = fields.Float(allow_none=True, metadata={
        "description": "Aggregated: null when the result does not fit the field's type (then `note` says why)."})
    note = fields.String(metadata={"description": "Aggregated only, with a null value: why it is null (overflow)."})
    location = fields.Nested(LocationSchema)
