"""Command payloads: what an operator posts, and the command with its result as it is read back."""
from marshmallow import fields, validate

import fleet_wire as wire

from ..pagination import page_schema
from ..schemas import StrictSchema, wire_rule

DEFAULT_TTL = 3600
# A device's broker session outlives a week of sleep at most; a longer TTL would be a promise
# the broker cannot keep.
MAX_TTL = 7 * 24 * 3600


class CommandCreateSchema(StrictSchema):
    command = fields.String(
        required=True,
        validate=wire_rule(wire.check_command_name),
        metadata={"description": "The command, e.g. `docker.logs`, `state.sls`, `test.ping`.",
                  "pattern": wire.COMMAND_NAME_PATTERN},
    )
    arg = fields.List(fields.Raw(allow_none=True), load_default=list, metadata={"description": "Positional arguments."})
    kwarg = fields.Dict(keys=fields.String(), load_default=dict, metadata={"description": "Keyword arguments."})
    timeout = fields.Float(
        load_default=None,
        allow_none=True,
        validate=validate.Range(min=0, min_inclusive=False, max=wire.MAX_COMMAND_TIMEOUT),
        metadata={"description": "Seconds the command may run on the device before it is reported "
                                 "timed_out; the command's own default when omitted."},
    )
    ttl = fields.Integer(
        load_default=DEFAULT_TTL,
        validate=validate.Range(min=1, max=MAX_TTL),
        metadata={"description": "Seconds the command waits for an offline device before it expires unrun."},
    )


class CommandSchema(StrictSchema):
    id = fields.String(dump_only=True)
    device = fields.String(attribute="device_id", dump_only=True)
    command = fields.String(dump_only=True)
    arg = fields.List(fields.Raw(), dump_only=True)
    kwarg = fields.Dict(dump_only=True)
    timeout = fields.Float(dump_only=True, allow_none=True)
    ttl = fields.Integer(dump_only=True)
    state = fields.String(dump_only=True, metadata={"enum": list(wire.COMMAND_STATES)})
    return_value = fields.Raw(data_key="return", dump_only=True, allow_none=True)
    error = fields.String(dump_only=True, allow_none=True)
    truncated = fields.Boolean(dump_only=True, metadata={"description": "The device capped a long output."})
    created_at = fields.DateTime(dump_only=True)
    expires_at = fields.DateTime(dump_only=True)
    published_at = fields.DateTime(dump_only=True, allow_none=True)
    delivered_at = fields.DateTime(dump_only=True, allow_none=True)
    started_at = fields.DateTime(dump_only=True, allow_none=True)
    finished_at = fields.DateTime(dump_only=True, allow_none=True)
    completed_at = fields.DateTime(dump_only=True, allow_none=True,
                                   metadata={"description": "When the server stored the final state."})


CommandPage = page_schema(CommandSchema, "CommandPage")
