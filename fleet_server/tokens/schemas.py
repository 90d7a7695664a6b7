"""API token payloads. The token's value appears once, in the answer to its creation."""
from marshmallow import ValidationError, fields, validate

from ..models import utcnow

from ..pagination import page_schema
from ..schemas import StrictSchema
from .service import ROLES


def _in_the_future(moment):
    if moment is not None and moment <= utcnow():
        raise ValidationError("must be in the future")


class TokenSchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    name = fields.String(required=True, validate=validate.Length(min=1, max=200), metadata={"example": "ci"})
    role = fields.String(
        load_default="admin", validate=validate.OneOf(ROLES),
        metadata={"description": "admin: everything; operator: all but tokens; viewer: read only."},
    )
    expires = fields.AwareDateTime(
        load_default=None, allow_none=True, attribute="expires_at", validate=_in_the_future,
        metadata={"description": "Optional expiry (ISO 8601 with a timezone).", "example": "2027-01-01T00:00:00Z"},
    )
    created_at = fields.DateTime(dump_only=True)
    revoked_at = fields.DateTime(dump_only=True, allow_none=True)


class CreatedTokenSchema(TokenSchema):
    token = fields.String(
        dump_only=True,
        metadata={"description": "The value to send as `Authorization: APIToken <token>`. Shown only here, once."},
    )


TokenPage = page_schema(TokenSchema, "TokenPage")
