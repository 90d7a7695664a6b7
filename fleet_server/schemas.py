"""Schema pieces shared by the resources: strict base classes, pagination and the error shape."""
from marshmallow import RAISE, Schema, fields, validate


class StrictSchema(Schema):
    """Input schemas reject fields they do not know, naming them."""

    class Meta:
        unknown = RAISE
        ordered = True


class PaginationArgs(StrictSchema):
    limit = fields.Integer(
        load_default=100, validate=validate.Range(min=1, max=1000), metadata={"description": "Page size (1-1000)."}
    )
    offset = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=2**31 - 1),
        metadata={"description": "How many items to skip."},
    )


class ErrorSchema(Schema):
    """The one shape of every 4xx/5xx answer."""

    code = fields.Integer(required=True, metadata={"description": "The HTTP status code.", "example": 400})
    status = fields.String(required=True, metadata={"description": "The HTTP status name.", "example": "Bad Request"})
    message = fields.String(
        required=True, metadata={"description": "What went wrong, for people.", "example": "version: Missing data."}
    )
    errors = fields.Dict(
        keys=fields.String(),
        required=True,
        metadata={
            "description": "Reasons by field (dotted path for nested fields); empty when no field is at fault.",
            "example": {"version": ["Missing data for required field."]},
        },
    )
