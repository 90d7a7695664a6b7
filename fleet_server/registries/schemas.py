"""Registry payloads. The password is write-only: it is loaded, never dumped."""
from marshmallow import fields, validate

from fleet_wire import REGISTRY_URL_PATTERN, check_registry_url

from ..pagination import page_schema
from ..schemas import StrictSchema, wire_rule


class RegistrySchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    name = fields.String(required=True, validate=validate.Length(min=1, max=200), metadata={"example": "private"})
    url = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=500), wire_rule(check_registry_url)],
        metadata={"example": "registry.example.com:5000", "pattern": REGISTRY_URL_PATTERN,
                  "description": "`[http(s)://]host[:port]`, as the agent accepts it: no credentials "
                                 "(use username and password), path, query or fragment."},
    )
    username = fields.String(load_default="", validate=validate.Length(max=200), metadata={"example": "deploy"})
    password = fields.String(
        load_only=True,
        validate=validate.Length(max=1000),
        metadata={"description": "Write-only: stored encrypted, never returned. Omit to keep the stored one."},
    )
    created_at = fields.DateTime(dump_only=True)


class RegistryPatchSchema(RegistrySchema):
    """The same fields, all optional: used with partial=True for PATCH."""


RegistryPage = page_schema(RegistrySchema, "RegistryPage")
