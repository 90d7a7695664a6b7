"""Telemetry batches (device → server) and the readings inside them."""
from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from .grammar import whole
from .messages import Message
from .protocol import INT64_MAX, INT64_MIN, WireError

GEO_POINT = "geo_point"
NUMERIC_TYPES = ("int", "long", "float", "double")
INTEGER_TYPES = ("int", "long")
TELEMETRY_TYPES = NUMERIC_TYPES + (GEO_POINT,)
MAX_BATCH_READINGS = 5000
FIELD_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$"
FIELD_NAME = re.compile(FIELD_NAME_PATTERN)
_MAX_TS = 32503680000.0  # year 3000: a bigger timestamp is a unit mistake (ms or µs sent as s)


class GeoPoint(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)]
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)]


class Reading(msgspec.Struct, kw_only=True, gc=False):
    """One reading: `value` is a finite number (a whole one within signed 64 bits for int/long),
    or a GeoPoint for geo_point; `ts` is epoch seconds (UTC) with microsecond resolution.

    Not frozen: the value is normalised to its type once checked (5.0 of an `int` is 5).
    """

    field: Annotated[str, msgspec.Meta(pattern=whole(FIELD_NAME_PATTERN))]
    type: Literal[TELEMETRY_TYPES]
    ts: Annotated[float, msgspec.Meta(ge=0, lt=_MAX_TS)]
    value: int | float | GeoPoint

    def __post_init__(self):
        kind, value = self.type, self.value
        if kind == GEO_POINT:
            if type(value) is not GeoPoint:
                raise WireError("value: a geo_point value is an object {lat, lon}")
        elif type(value) is GeoPoint:
            raise WireError(f"value: a {kind} value is a finite number")
        elif kind in INTEGER_TYPES:
            if value != int(value):
                raise WireError(f"value: a {kind} value is a whole number")
            if not INT64_MIN <= value <= INT64_MAX:
                # Bigger whole numbers overflow what the server's aggregates can answer.
                raise WireError(f"value: a {kind} value fits a signed 64-bit integer ({INT64_MIN} to {INT64_MAX})")
            self.value = int(value)
        else:
            self.value = float(value)


class TelemetryBatch(Message, frozen=True, kw_only=True):
    """device → server: readings the device buffered, sent once per `batch_id`.

    `dropped` counts the readings the device's full buffer has discarded since it was created.
    """

    batch_id: Annotated[str, msgspec.Meta(pattern=whole(r"^[0-9a-f]{32}$"))]
    dropped: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0
    readings: Annotated[list[Reading], msgspec.Meta(min_length=1, max_length=MAX_BATCH_READINGS)]
