"""Provisioning payloads."""
from marshmallow import fields, validate

from ..schemas import StrictSchema

MAX_LIFETIME = 30 * 24 * 3600
# Printable, no whitespace: a hardware id ends up in logs and must not forge lines there.
HARDWARE_ID = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,199}$", error="1-200 letters, digits, ':', '.', '_' or '-'")


class ProvisioningTokenCreate(StrictSchema):
    name = fields.String(load_default="", validate=validate.Length(max=200))
    expires_in = fields.Integer(
        load_default=3600, strict=True, validate=validate.Range(min=60, max=MAX_LIFETIME),
        metadata={"description": "Seconds until the token expires (60 s to 30 days)."},
    )


class ProvisioningTokenRead(StrictSchema):
    id = fields.Integer()
    name = fields.String()
    created_at = fields.DateTime()
    expires_at = fields.DateTime()
    used_at = fields.DateTime(allow_none=True)
    device = fields.String(attribute="device_id", allow_none=True)


class ProvisioningTokenCreated(ProvisioningTokenRead):
    token = fields.String(metadata={"description": "The secret, shown only in this response."})


class RegistrationRequest(StrictSchema):
    token = fields.String(required=True, validate=validate.Length(min=1, max=200))
    hardware_id = fields.String(required=True, validate=HARDWARE_ID)
    name = fields.String(load_default="", validate=validate.Length(max=200))


class BrokerAccount(StrictSchema):
    url = fields.String()
    username = fields.String(allow_none=True)
    password = fields.String(allow_none=True)
    ca_certificate = fields.String(allow_none=True, metadata={"description": "PEM of the CA that signed the broker's certificate."})


class Registration(StrictSchema):
    id = fields.String()
    unit_id = fields.String()
    broker = fields.Nested(BrokerAccount)
