"""The wire's previous decoders, frozen: marshmallow schemas as the agent and server used them before msgspec.

Test-only: a reference implementation of the previous agent and server, which the
compatibility tests (tests/test_wire_compatibility.py) decode the new encoder's messages
with. Do not change it to follow fleet_wire: it stands for the code already on devices.
"""
from __future__ import annotations

import json
import math
import re
import uuid

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

PROTOCOL_VERSION = 1


def decode(schema: Schema, payload: bytes) -> dict:
    """What the previous code's decode gave: the payload parsed, then loaded by its schema."""
    document = json.loads(payload)
    if not isinstance(document, dict):
        raise ValidationError("payload is not a JSON object")
    return schema.load(document)


def plain(value):
    """A decoded value as plain JSON values (a UUID as its text), as tests/data/wire_v1/decoded.json holds them."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


# ---- as fleet_wire/grammar.py was ----
# The agent checks these itself too: a release document must not be able to walk out of a
# path or point the engine at a surprising place, whoever wrote it.

_SAFE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
# Written so that it means the same to Python and to JSON Schema (the API document publishes it).
REGISTRY_URL_PATTERN = (
    r"^(?:https?://)?"
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?/?$"
)
_REGISTRY_URL = re.compile(REGISTRY_URL_PATTERN)


def check_container_name(name: str) -> None:
    """Docker's container name grammar: no '/', no leading '.', nothing to climb with."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValidationError(f"{name!r} is not a safe container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128)")


def check_bind(bind: str) -> None:
    """`/host/path:/container/path[:ro|rw]`: both absolute, no '..' segment, no NUL."""
    parts = bind.split(":") if isinstance(bind, str) else []
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ValidationError(f"{bind!r} is not host:container[:ro|rw]")
    for path in parts[:2]:
        if not path.startswith("/") or "\x00" in path:
            raise ValidationError(f"{bind!r}: {path!r} is not an absolute path")
        if ".." in path.split("/"):
            raise ValidationError(f"{bind!r}: {path!r} climbs out with '..'")


def check_registry_url(url: str) -> None:
    """A registry is `[http(s)://]host[:port]`: no credentials, path, query or '..' smuggled in.

    The one grammar of registry addresses: the server's API validates with it too, so a release
    it accepts is never refused on the device.
    """
    if not isinstance(url, str) or not _REGISTRY_URL.fullmatch(url):
        # The address itself is not repeated: it may hold a password.
        raise ValidationError("not a registry address ([https://]host[:port])")


# ---- as fleet_wire/messages.py was ----
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


release_message = ReleaseMessageSchema()
release_seq_marker = ReleaseSeqMarkerSchema()
deployment_report = DeploymentReportSchema()
status_message = StatusSchema()


# ---- as fleet_wire/telemetry.py was ----
GEO_POINT = "geo_point"
NUMERIC_TYPES = ("int", "long", "float", "double")
INTEGER_TYPES = ("int", "long")
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
TELEMETRY_TYPES = NUMERIC_TYPES + (GEO_POINT,)
MAX_BATCH_READINGS = 5000
FIELD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")


_MAX_TS = 32503680000.0  # year 3000: a bigger timestamp is a unit mistake (ms or µs sent as s)
_READING_KEYS = frozenset(("field", "type", "ts", "value"))


def check_reading(item, ignore_unknown: bool = False) -> dict:
    """One reading `{field, type, ts, value}` checked and normalised, or ValidationError naming each bad key.

    Keys it does not know are an error unless `ignore_unknown` (as on the wire, where a newer
    agent may send more).

    `value` is a finite number (a whole one within signed 64 bits for int/long), or `{lat, lon}` for geo_point;
    `ts` is epoch seconds (UTC) with microsecond resolution. Written by hand rather than as a
    nested marshmallow schema because batches carry thousands of readings and marshmallow
    costs ~75 µs per reading, which alone would cap a worker near 13,000 readings/s.
    """
    if not isinstance(item, dict):
        raise ValidationError("a reading is an object {field, type, ts, value}")
    errors = {}
    for key in () if ignore_unknown else item.keys() - _READING_KEYS:
        errors[key] = ["Unknown field."]
    for key in _READING_KEYS - item.keys():
        errors[key] = ["Missing data for required field."]
    field, kind, ts, value = item.get("field"), item.get("type"), item.get("ts"), item.get("value")
    if "field" in item and not (isinstance(field, str) and FIELD_NAME.match(field)):
        errors["field"] = ["1 to 200 characters: letters, digits and _ . : - (not first)"]
    if "type" in item and kind not in TELEMETRY_TYPES:
        errors["type"] = [f"one of {', '.join(TELEMETRY_TYPES)}"]
    if "ts" in item and not (_is_number(ts) and 0 <= ts < _MAX_TS):
        errors["ts"] = ["epoch seconds (UTC) between 1970 and 3000"]
    if "value" in item and kind in TELEMETRY_TYPES:
        problem, value = _check_value(kind, value)
        if problem:
            errors["value"] = [problem]
    if errors:
        raise ValidationError(errors)
    return {"field": field, "type": kind, "ts": float(ts), "value": value}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(kind, value):
    """(problem, normalised value): problem is None when the value fits the type."""
    if kind == GEO_POINT:
        if not (isinstance(value, dict) and value.keys() == {"lat", "lon"}):
            return "a geo_point value is an object {lat, lon}", None
        lat, lon = value["lat"], value["lon"]
        if not (_is_number(lat) and -90 <= lat <= 90 and _is_number(lon) and -180 <= lon <= 180):
            return "lat must be a number in [-90, 90] and lon in [-180, 180]", None
        return None, {"lat": float(lat), "lon": float(lon)}
    if not _is_number(value):
        return f"a {kind} value is a finite number", None
    if kind in INTEGER_TYPES:
        if value != int(value):
            return f"a {kind} value is a whole number", None
        if not INT64_MIN <= value <= INT64_MAX:
            # Bigger whole numbers overflow what the server's aggregates can answer.
            return f"a {kind} value fits a signed 64-bit integer ({INT64_MIN} to {INT64_MAX})", None
        return None, int(value)
    return None, float(value)


class ReadingList(fields.Field):
    """A list of readings, each checked by `check_reading`; errors are keyed by position."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("a list of readings")
        if not 1 <= len(value) <= MAX_BATCH_READINGS:
            raise ValidationError(f"between 1 and {MAX_BATCH_READINGS} readings")
        readings, errors = [], {}
        for position, item in enumerate(value):
            try:
                readings.append(check_reading(item, ignore_unknown=True))
            except ValidationError as exc:
                errors[position] = exc.messages
                if len(errors) >= 10:
                    break  # enough to say what is wrong
        if errors:
            raise ValidationError(errors)
        return readings

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class TelemetryBatchSchema(Message):
    """device → server: readings the device buffered, sent once per `batch_id`.

    `dropped` counts the readings the device's full buffer has discarded since it was created.
    """

    batch_id = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{32}$"))
    dropped = fields.Integer(load_default=0, validate=validate.Range(min=0))
    readings = ReadingList(required=True)


telemetry_batch = TelemetryBatchSchema()


# ---- as fleet_wire/commands.py was ----
#
# The command message also carries MQTT v5 properties: ResponseTopic (the device's
# results topic), CorrelationData (the command id) and MessageExpiryInterval (the
# seconds left of its TTL), so the broker drops it unread once it expired.

COMMAND_STATES = ("queued", "delivered", "running", "succeeded", "failed", "expired", "timed_out")
# The states a device reports; `queued` is the server's alone.
COMMAND_REPORT_STATES = COMMAND_STATES[1:]
FINAL_COMMAND_STATES = ("succeeded", "failed", "expired", "timed_out")
MAX_COMMAND_TIMEOUT = 24 * 3600
MAX_COMMAND_ERROR = 4000
# A command's arguments must leave room in the message for everything else.
MAX_COMMAND_ARGUMENTS_BYTES = 64 * 1024


class CommandMessageSchema(Message):
    """server → device: run `command` with `arg`/`kwarg` once, unless `deadline` (epoch seconds) passed.

    `timeout` is null when the device should use the command's own default.
    """

    id = fields.UUID(required=True)
    command = fields.String(required=True, validate=validate.Length(min=1, max=200))
    arg = fields.List(fields.Raw(allow_none=True), load_default=list)
    kwarg = fields.Dict(keys=fields.String(), load_default=dict)
    timeout = fields.Float(load_default=None, allow_none=True,
                           validate=validate.Range(min=0, min_inclusive=False, max=MAX_COMMAND_TIMEOUT))
    deadline = fields.Float(required=True)


class CommandResultSchema(Message):
    """device → server: the state of one command; a final state carries its return value or error."""

    id = fields.UUID(required=True)
    state = fields.String(required=True, validate=validate.OneOf(COMMAND_REPORT_STATES))
    return_value = fields.Raw(data_key="return", load_default=None, allow_none=True)
    error = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=MAX_COMMAND_ERROR))
    truncated = fields.Boolean(load_default=False)
    started_at = fields.Float(load_default=None, allow_none=True)
    finished_at = fields.Float(load_default=None, allow_none=True)
    ts = fields.Float(required=True)


command_message = CommandMessageSchema()
command_result = CommandResultSchema()

# ---- as fleet_wire/confirmations.py was ----
#
# A report counts as delivered once the server has stored it, not once the broker took it:
# a broker that restarts can acknowledge a report and drop it before any worker is
# subscribed again. So the device keeps each report until a confirmation names it, and
# sends it again after a reconnect and periodically; storing a report twice changes nothing.

MAX_CONFIRMED_IDS = 1000


class ConfirmationSchema(Message):
    """server → device on `confirmations`, QoS 1, not retained: reports the server is done with.

    `ids` names each report stored (or refused for good, so the device stops resending it):
    a deployment report or status by its `rid`, a telemetry batch by its `batch_id`, a
    command's final result by the command's `id`.
    """

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=64)), load_default=list,
                      validate=validate.Length(max=MAX_CONFIRMED_IDS))


confirmation = ConfirmationSchema()
