"""Device payloads."""
import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii

from marshmallow import fields, validate

from ..driver_statements import utc_timestamp
from ..pagination import page_schema
from ..schemas import PaginationArgs, StrictSchema


class DeviceSchema(StrictSchema):
    id = fields.String(dump_only=True, metadata={"example": "734c361a-ba56-472a-a891-ee2af1a80570"})
    unit_id = fields.UUID(
        load_default=None,
        metadata={"description": "The id the agent uses on the wire; generated when omitted.",
                  "example": "4e633880-ef6e-4c20-77ed-5761b3de5d4c"},
    )
    name = fields.String(load_default="", validate=validate.Length(max=200), metadata={"example": "van-12"})
    description = fields.String(load_default="", validate=validate.Length(max=10000))
    tags = fields.List(
        fields.String(validate=validate.Length(min=1, max=100)), load_default=list, validate=validate.Length(max=100)
    )
    created_at = fields.DateTime(dump_only=True)
    last_seen_at = fields.DateTime(dump_only=True, allow_none=True, metadata={"description": "Last status report."})
    online = fields.Boolean(dump_only=True)
    agent_version = fields.String(dump_only=True, allow_none=True)
    docker_releases = fields.List(
        fields.Integer(), dump_only=True,
        metadata={"description": "Ids of the releases the device reports as deployed and running."},
    )


class DeviceUpdateSchema(StrictSchema):
    """What an operator may change on a registered device: the unit id is fixed."""

    name = fields.String(required=True, validate=validate.Length(max=200))
    tags = fields.List(
        fields.String(validate=validate.Length(min=1, max=100)), required=True, validate=validate.Length(max=100)
    )
    description = fields.String(required=True, validate=validate.Length(max=10000))


class DevicePatchSchema(DeviceUpdateSchema):
    """The same fields, all optional: used with partial=True for PATCH."""


class DeviceListArgs(PaginationArgs):
    unit_id = fields.UUID(metadata={"description": "Only the device with this unit id."})
    name = fields.String(validate=validate.Length(max=200), metadata={"description": "Only devices with this name."})
    online = fields.Boolean(metadata={"description": "Only devices that are (or are not) online."})


DevicePage = page_schema(DeviceSchema, "DevicePage")


# The columns device_json reads, in the order it reads them.
DOCUMENT_COLUMNS = ("id", "unit_id", "name", "description", "tags", "created_at", "last_seen_at", "online",
                    "agent_version")

# DeviceSchema's fields in the order Flask's JSON provider writes them (sorted keys).
_DEVICE_JSON = ('{"agent_version":%s,"created_at":%s,"description":%s,"docker_releases":[%s],"id":%s,'
                '"last_seen_at":%s,"name":%s,"online":%s,"tags":%s,"unit_id":%s}')
_json_decoder = json.JSONDecoder()


def _timestamp_json(value) -> str:
    """A UTC timestamp as DeviceSchema writes it (`2026-03-01T12:00:00.000001+00:00`, no fraction when zero).

    The statements read timestamps without SQLAlchemy's conversion: SQLite hands back the
    text SQLAlchemy stored (`2026-03-01 12:00:00.000001`), PostgreSQL a naive datetime, both
    in UTC (models.UTCDateTime). Rewriting the text costs a fraction of parsing it.
    """
    if type(value) is str:
        if len(value) == 26 and value[10] == " " and value[19] == ".":
            fraction = "" if value.endswith("000000") else value[19:]
            return f'"{value[:10]}T{value[11:19]}{fraction}+00:00"'
    return f'"{utc_timestamp(value).isoformat()}"'  # text SQLAlchemy did not write, or a datetime


def _tags_json(tags) -> str:
    """The tags as fields.List(fields.String()) writes them, in Flask's compact JSON."""
    if type(tags) is str:  # SQLite hands back the stored JSON text
        text = tags
        try:
            tags, end = _json_decoder.raw_decode(text)  # json.loads less its checks: a sixth of its cost
        except ValueError:
            end = None
        if end != len(text):  # whitespace around the value, which SQLAlchemy does not write
            tags = json.loads(text)
    try:
        return "[" + ",".join(map(encode_basestring_ascii, tags)) + "]"
    except TypeError:  # not only strings: fields.String writes None as null and anything else as its text
        return "[" + ",".join(["null" if tag is None else encode_basestring_ascii(str(tag)) for tag in tags]) + "]"


def device_json(columns, docker_releases: Sequence[int]) -> str:
    """The JSON text DeviceSchema's dump gives through Flask's JSON provider, from a device's DOCUMENT_COLUMNS values.

    The list and retrieve answers are built this way: a marshmallow dump, or building dicts
    and encoding them, cost more than the rest of the request. DeviceSchema stays the
    documented contract; tests/test_device_answers.py proves both give the same bytes on
    every database. Strings are escaped by the json module's own (C) function, as its
    encoder does; id, unit_id, name, description, tags, created_at and online are NOT NULL.
    """
    id_, unit_id, name, description, tags, created_at, last_seen_at, online, agent_version = columns
    # The common values (no releases, no tags, never seen) skip a call each: a third of the time for a page.
    return _DEVICE_JSON % (
        "null" if agent_version is None else encode_basestring_ascii(agent_version),
        _timestamp_json(created_at),
        encode_basestring_ascii(description),
        ",".join(map(str, docker_releases)) if docker_releases else "",
        encode_basestring_ascii(id_),
        "null" if last_seen_at is None else _timestamp_json(last_seen_at),
        encode_basestring_ascii(name),
        "true" if online else "false",
        "[]" if tags == "[]" else _tags_json(tags),
        encode_basestring_ascii(unit_id),
    )
