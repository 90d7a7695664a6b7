"""Device payloads."""
from marshmallow import fields, validate

from ..pagination import page_schema
from ..schemas import StrictSchema


class DeviceSchema(StrictSchema):
    id = fields.String(dump_only=True)
    unit_id = fields.UUID(load_default=None, metadata={"description": "Generated when omitted."})
    name = fields.String(load_default="", validate=validate.Length(max=200))
    description = fields.String(load_default="", validate=validate.Length(max=10000))
    tags = fields.List(fields.String(validate=validate.Length(min=1, max=100)), load_default=list)
    created_at = fields.DateTime(dump_only=True)
    last_seen_at = fields.DateTime(dump_only=True)
    online = fields.Boolean(dump_only=True)
    agent_version = fields.String(dump_only=True)
    docker_releases = fields.List(fields.Integer(), dump_only=True)


DevicePage = page_schema(DeviceSchema, "DevicePage")
