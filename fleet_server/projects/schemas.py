"""Project payloads."""
from marshmallow import fields, validate

from ..pagination import page_schema
from ..schemas import StrictSchema


class ProjectSchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    name = fields.String(required=True, validate=validate.Length(min=1, max=200), metadata={"example": "deployment"})
    description = fields.String(load_default="", validate=validate.Length(max=10000))
    created_at = fields.DateTime(dump_only=True)


class ProjectPatchSchema(ProjectSchema):
    """The same fields, all optional: used with partial=True for PATCH."""


class ProjectDeleteArgs(StrictSchema):
    force = fields.Boolean(
        load_default=False,
        metadata={"description": "Delete a project that has releases, retracting them from their devices."},
    )


ProjectPage = page_schema(ProjectSchema, "ProjectPage")
