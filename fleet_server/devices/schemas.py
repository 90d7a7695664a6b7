"""Device payloads."""
from marshmallow import fields, validate

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


def _isoformat(moment):
    return moment.isoformat() if moment is not None else None


# The columns device_document reads, in the order it reads them.
DOCUMENT_COLUMNS = ("id", "unit_id", "name", "description", "tags", "created_at", "last_seen_at", "online",
                    "agent_version")


def device_document(columns, docker_releases: list[int]) -> dict:
    """What DeviceSchema dumps for a device, built directly from its DOCUMENT_COLUMNS values.

    The list and retrieve answers use it: a marshmallow dump cost as much as the rest of the
    request. DeviceSchema stays the documented contract; tests/test_device_answers.py proves
    both give the same JSON, byte for byte, on every database.
    """
    id_, unit_id, name, description, tags, created_at, last_seen_at, online, agent_version = columns[:9]
    return {
        "id": id_,
        "unit_id": unit_id,
        "name": name,
        "description": description,
        "tags": list(tags) if tags is not None else None,
        "created_at": _isoformat(created_at),
        "last_seen_at": _isoformat(last_seen_at),
        "online": online,
        "agent_version": agent_version,
        "docker_releases": docker_releases,
    }
