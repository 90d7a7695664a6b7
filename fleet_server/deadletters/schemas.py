"""Dead letter payloads: a summary in lists, the kept payload only when one is read."""
import base64

from marshmallow import fields, validate

from ..pagination import page_schema
from ..schemas import PaginationArgs, StrictSchema


class DeadLetterSummarySchema(StrictSchema):
    id = fields.Integer(dump_only=True)
    received_at = fields.DateTime(dump_only=True)
    topic = fields.String(dump_only=True, metadata={"description": "The MQTT topic the report came on."})
    unit_id = fields.String(dump_only=True, allow_none=True,
                            metadata={"description": "The device the topic names; null if it names none."})
    kind = fields.String(dump_only=True, allow_none=True, metadata={"description": "deployments, status, ..."})
    reason = fields.String(dump_only=True, metadata={"description": "Why it was not stored."})
    payload_size = fields.Integer(dump_only=True, metadata={"description": "The payload's size in bytes."})


class DeadLetterSchema(DeadLetterSummarySchema):
    payload = fields.Function(
        lambda letter: bytes(letter.payload).decode("utf-8", "backslashreplace"), dump_only=True,
        metadata={"description": "The kept payload as text; bytes that are not UTF-8 shown as \\xNN."})
    payload_base64 = fields.Function(
        lambda letter: base64.b64encode(bytes(letter.payload)).decode("ascii"), dump_only=True,
        metadata={"description": "The kept payload's exact bytes."})
    payload_truncated = fields.Function(
        lambda letter: len(letter.payload) < letter.payload_size, dump_only=True,
        metadata={"description": "Whether only the payload's first 64 KiB were kept."})


class DeadLetterArgs(PaginationArgs):
    unit_id = fields.String(load_default=None, validate=validate.Length(max=36),
                            metadata={"description": "Only this device's dead letters."})
    kind = fields.String(load_default=None, validate=validate.Length(max=20),
                         metadata={"description": "Only this kind: deployments, status, telemetry, results."})


DeadLetterPage = page_schema(DeadLetterSummarySchema, "DeadLetterPage")
