"""Schema pieces shared by the resources: strict base classes and pagination."""
from marshmallow import RAISE, Schema, fields, validate


class StrictSchema(Schema):
    """Input schemas reject fields they do not know, naming them."""

    class Meta:
        unknown = RAISE
        ordered = True


class PaginationArgs(StrictSchema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))
