"""Device payloads."""
from collections.abc import Sequence

import msgspec
from marshmallow import fields, validate

from .driver_statements import utc_timestamp
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


# The list and retrieve answers are encoded from these Structs, DeviceSchema's fields declared for
# msgspec (which encodes a page of a hundred devices in a fraction of a marshmallow dump's time),
# in the sorted order Flask's JSON provider writes. tests/test_device_answers.py holds their
# answers equal to DeviceSchema's and DevicePage's on every database.

class DeviceAnswer(msgspec.Struct):
    """A device as the list and retrieve answers carry it: DeviceSchema's dump."""

    agent_version: str | None
    created_at: str
    description: str
    docker_releases: Sequence[int]
    id: str
    last_seen_at: str | None
    name: str
    online: bool
    tags: list
    unit_id: str


class DevicePageAnswer(msgspec.Struct):
    """One page of the device list: DevicePage's dump."""

    count: int
    next: str | None
    previous: str | None
    results: list[DeviceAnswer]


# The columns device_answer reads, in the order it reads them.
DOCUMENT_COLUMNS = ("id", "unit_id", "name", "description", "tags", "created_at", "last_seen_at", "online",
                    "agent_version")
_json = msgspec.json.Encoder()


def encode_answer(answer: DeviceAnswer | DevicePageAnswer) -> bytes:
    return _json.encode(answer)


def _timestamp(value) -> str:
    """A UTC timestamp as DeviceSchema writes it (`2026-03-01T12:00:00.000001+00:00`, no fraction when zero).

    The device reads take timestamps without SQLAlchemy's conversion: SQLite hands back the
    text SQLAlchemy stored (`2026-03-01 12:00:00.000001`), PostgreSQL a naive datetime, both
    in UTC (models.UTCDateTime). Rewriting the text costs a fraction of parsing it.
    """
    if type(value) is str and len(value) == 26 and value[10] == " " and value[19] == ".":
        fraction = "" if value.endswith("000000") else value[19:]
        return f"{value[:10]}T{value[11:19]}{fraction}+00:00"
    return utc_timestamp(value).isoformat()  # text SQLAlchemy did not write, or a datetime


def _tags(tags) -> list:
    """The tags as a list: SQLite hands back the stored JSON text, PostgreSQL the list."""
    return msgspec.json.decode(tags) if type(tags) is str else tags


def device_answer(columns, docker_releases: Sequence[int]) -> DeviceAnswer:
    """A device's answer from its DOCUMENT_COLUMNS values as the driver gives them."""
    id_, unit_id, name, description, tags, created_at, last_seen_at, online, agent_version = columns
    return DeviceAnswer(
        agent_version=agent_version, created_at=_timestamp(created_at), description=description,
        docker_releases=docker_releases, id=id_,
        last_seen_at=None if last_seen_at is None else _timestamp(last_seen_at), name=name, online=bool(online),
        tags=[] if tags == "[]" else _tags(tags), unit_id=unit_id,
    )
