"""Registry payloads. The password is write-only: it is loaded, never dumped."""
from urllib.parse import urlsplit

from marshmallow import ValidationError, fields, validate

from ..pagination import page_schema
from ..schemas import StrictSchema


def _check_url(value: str):
    try:
        parts = urlsplit(value if "://" in value else f"//{value}")
    except ValueError as exc:  # e.g. an unbalanced "[" of an IPv6 address
        raise ValidationError(f"not a URL: {exc}") from None
    if parts.scheme not in ("", "http", "https") or not parts.hostname:
        raise ValidationError("expected HOST[:PORT] or http(s)://HOST[:PORT][/PATH]")
    try:
        parts.port
    except ValueError:
        raise ValidationError("the port is not a number") from None
    if any(c.isspace() for c in value):
        raise ValidationError("must not contain spaces")


class RegistrySchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    name = fields.String(required=True, validate=validate.Length(min=1, max=200), metadata={"example": "private"})
    url = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=500), _check_url],
        metadata={"example": "registry.example.com:5000"},
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
