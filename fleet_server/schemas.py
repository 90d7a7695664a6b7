"""Schema pieces shared by the resources: strict base classes, pagination and the error shape."""
from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validate

from fleet_wire import WireError


def wire_rule(check):
    """A validator for `validate=` from a grammar check of fleet_wire (which raises WireError)."""

    def validate_by_wire_rule(value):
        try:
            check(value)
        except WireError as exc:
            raise ValidationError(str(exc)) from None

    return validate_by_wire_rule


def _nul_byte_paths(value, path=""):
    """Dotted paths of the strings (keys included) that contain a NUL byte."""
    if isinstance(value, str):
        return [path or "_schema"] if "\x00" in value else []
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            found += [child] if isinstance(key, str) and "\x00" in key else _nul_byte_paths(item, child)
        return found
    if isinstance(value, (list, tuple)):
        return [p for index, item in enumerate(value) for p in _nul_byte_paths(item, f"{path}.{index}" if path else str(index))]
    return []


class StrictSchema(Schema):
    """Input schemas reject fields they do not know, naming them, and strings holding NUL bytes.

    PostgreSQL cannot store a NUL in text, and no name, tag or path legitimately has one.
    """

    class Meta:
        unknown = RAISE
        ordered = True

    @pre_load
    def _reject_nul_bytes(self, data, **kwargs):
        if hasattr(data, "to_dict"):  # query strings arrive as a MultiDict proxy
            data_view = {key: data.getlist(key) for key in data} if hasattr(data, "getlist") else dict(data)
        else:
            data_view = data
        paths = _nul_byte_paths(data_view)
        if paths:
            raise ValidationError({path: ["must not contain a NUL byte"] for path in paths})
        return data


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
