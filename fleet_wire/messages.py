"""Release documents, deployment reports and status: their schemas, and encode/decode."""
from __future__ import annotations

import json
import re

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .grammar import check_bind, check_container_name, check_registry_url
from .protocol import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, WireError
from .strict_json import UnstorableJSON, check_storable, load_json

DEPLOYMENT_STATES = (
    "queued",
    "started",
    "pulling",
    "stopping",
    "starting",
    "verifying",
    "succeeded",
    "failed",
    "rolled_back",
)
FINAL_DEPLOYMENT_STATES = ("succeeded", "failed", "rolled_back")
# Deployment states only the server writes; no device may report them.
SERVER_DEPLOYMENT_STATES = ("pending", "superseded")
# What a state a newer agent reports looks like: recorded as sent, though this side does not know it.
_STATE_WORD = re.compile(r"^[a-z][a-z_]{0,19}$")


class Message(Schema):
    """Every payload carries the protocol version it was written for."""

    class Meta:
        unknown = EXCLUDE

    v = fields.Integer(required=True, validate=validate.Equal(PROTOCOL_VERSION))


class StartupParametersSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    environment = fields.String(load_default="")
    binds = fields.List(fields.String(validate=check_bind), load_default=list)
    network_mode = fields.String(load_default=None, allow_none=True)
    restart_policy = fields.String(load_default=None, allow_none=True)
    privileged = fields.Boolean(load_default=False)


class RegistryCredentialsSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    id = fields.Integer(required=True)
    url = fields.String(required=True, validate=check_registry_url)
    username = fields.String(load_default="")
    password = fields.String(load_default="")


class ContainerSpecSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String(required=True, validate=check_container_name)
    image = fields.String(required=True, validate=validate.Length(min=1))
    tag = fields.String(required=True, validate=validate.Length(min=1))
    required_tags = fields.List(fields.String(), load_default=list)
    startup_parameters = fields.Nested(StartupParametersSchema, load_default=dict)
    purge_data = fields.Boolean(load_default=False)
    registry = fields.Integer(load_default=None, allow_none=True)
    fully_qualified_name = fields.String(required=True, validate=check_container_name)


class ReleaseSpecSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    id = fields.Integer(required=True)
    version = fields.String(required=True)
    version_hash = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{8}$"))
    containers = fields.List(fields.Nested(ContainerSpecSchema), required=True)
    remove_containers = fields.List(fields.String(validate=check_container_name), load_default=list)


class ReleaseMessageSchema(Message):
    """server → device, retained: the device's active release of one project.

    `release` is null in a tombstone: the project has nothing on this device any more.
    `seq` grows with every publication on any release topic (one database sequence): a device
    ignores a document with a lower seq than it has seen for the project. Optional: a server
    older than the field sends none, and such a document is accepted as it always was.
    """

    seq = fields.Integer(load_default=None, allow_none=True, strict=True, validate=validate.Range(min=1))
    project_id = fields.Integer(required=True)
    release = fields.Nested(ReleaseSpecSchema, required=True, allow_none=True)
    registries = fields.List(fields.Nested(RegistryCredentialsSchema), load_default=list)


# A report's own id (`rid`), which the server's confirmation names: short, opaque, chosen by the device.
REPORT_ID = validate.Regexp(r"^[0-9A-Za-z_-]{1,64}$")


class DeploymentReportSchema(Message):
    """device → server: progress of one release on the reporting device.

    `rid` (optional) names the report in the server's confirmation; a device resends the
    report until it is confirmed, so the server may receive it more than once.
    """

    rid = fields.String(load_default=None, allow_none=True, validate=REPORT_ID)
    project_id = fields.Integer(required=True)
    release_id = fields.Integer(required=True)
    version_hash = fields.String(load_default=None, allow_none=True)
    # A state this side does not know (a newer agent's) is recorded as sent: see check_deployment_state.
    state = fields.String(required=True, validate=lambda state: check_deployment_state(state))
    step = fields.String(load_default=None, allow_none=True)
    detail = fields.String(load_default="", validate=validate.Length(max=4000))
    ts = fields.Float(required=True)


def check_deployment_state(state: str) -> None:
    """A known state, or a word a newer agent may use (lowercase, at most 20 characters); never the server's own."""
    if state in SERVER_DEPLOYMENT_STATES:
        raise ValidationError(f"{state!r} is a state only the server records")
    if state not in DEPLOYMENT_STATES and not _STATE_WORD.match(state):
        raise ValidationError(f"{state!r} is not a deployment state (lowercase letters and _, at most 20)")


class ReleaseSeqMarkerSchema(Message):
    """server → server, retained on RELEASE_SEQ_MARKER_TOPIC: the highest release seq the broker acknowledged."""

    seq = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))


class StatusSchema(Message):
    """device → server, retained with a last will: is the agent online. `rid` as in a deployment report."""

    rid = fields.String(load_default=None, allow_none=True, validate=REPORT_ID)
    state = fields.String(required=True, validate=validate.OneOf(("online", "offline")))
    agent_version = fields.String(load_default=None, allow_none=True)
    ts = fields.Float(load_default=None, allow_none=True)


def encode(schema: Schema, message: dict) -> bytes:
    """Serialise a payload after checking it against its schema.

    A schema may have a quick check of its usual message in plain code (`is_usual`); what it
    passes skips the schema's own validation, which names what is wrong with anything else.
    """
    body = {"v": PROTOCOL_VERSION, **message}
    is_usual = getattr(schema, "is_usual", None)
    if is_usual is None or not is_usual(message):
        errors = schema.validate(body)
        if errors:
            raise WireError(f"outgoing {type(schema).__name__} is invalid: {errors}")
    try:
        check_storable(body)  # what the other side's load_json would refuse is not sent
    except UnstorableJSON as exc:
        raise WireError(f"outgoing {type(schema).__name__} is not storable JSON: {exc}") from None
    try:
        # NaN and Infinity are not JSON: a strict parser (the server's among them) refuses the whole message.
        return json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except ValueError as exc:
        raise WireError(f"outgoing {type(schema).__name__} is not JSON: {exc}") from None


def decode(schema: Schema, payload: bytes) -> dict:
    """Parse and validate a payload; WireError names what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        document = load_json(payload)
    except UnstorableJSON as exc:
        raise WireError(f"payload refused: {exc}") from None
    if not isinstance(document, dict):
        raise WireError("payload is not a JSON object")
    load_usual = getattr(schema, "load_usual", None)  # a schema's quick check of its usual message, if it has one
    if load_usual is not None:
        loaded = load_usual(document)
        if loaded is not None:
            return loaded
    try:
        return schema.load(document)
    except ValidationError as exc:
        raise WireError(f"payload is invalid: {exc.messages}") from None
    except RecursionError:
        raise WireError("payload is nested too deeply") from None


release_message = ReleaseMessageSchema()
release_seq_marker = ReleaseSeqMarkerSchema()
deployment_report = DeploymentReportSchema()
status_message = StatusSchema()
