"""The MQTT wire contract shared by the server and the device agent.

Topic names, payload schemas and the protocol version are defined here once and
imported by both sides, so the two cannot drift apart.

The wire grows without breaking (docs/architecture.md, "Evolving the wire"): every schema
here ignores fields it does not know, and a change to the protocol only adds optional
fields, so an older agent and a newer server (or the reverse) keep understanding each other.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

PROTOCOL_VERSION = 1
TOPIC_ROOT = "fleet/v1/devices"
# Retained, written and read by the server's workers only: the highest release seq published.
RELEASE_SEQ_MARKER_TOPIC = "fleet/v1/server/release-seq"
SHARED_GROUP = "fleet-server"

# Largest payload either side accepts; anything bigger is dropped unparsed.
MAX_PAYLOAD_BYTES = 1024 * 1024

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


class WireError(ValueError):
    """A message that does not follow the wire contract."""


# --- Strict JSON: what both sides accept, on MQTT and over HTTP alike ---
# Python's json module accepts more than a database can store or another parser can read:
# NaN and Infinity, lone surrogates (from "\ud800" escapes), NUL bytes, integers of any size
# (and raises ValueError past 4,300 digits) and nesting as deep as the stack (RecursionError).
# `load_json` refuses each of these, naming where it is, so a bad message is refused when it
# is read instead of failing later where it is stored.

MAX_JSON_DEPTH = 32  # objects and arrays inside each other; Fleet's own documents need fewer than 8
_INT_MIN, _INT_MAX = -2 ** 63, 2 ** 63 - 1  # what a BIGINT column (and SQLite's INTEGER) stores
_UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class UnstorableJSON(WireError):
    """JSON that breaks a rule of `load_json`; `path` is the dotted path of the value at fault ("" for the whole)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class _OutOfRange:
    """Stands for an integer literal too large to store until the check after parsing names where it is."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))


def _bounded_int(literal: str):
    # Checked on the literal first: int() itself raises ValueError past 4,300 digits.
    if len(literal) > 20:
        return _OutOfRange(literal)
    value = int(literal)
    return value if _INT_MIN <= value <= _INT_MAX else _OutOfRange(literal)


_STRICT_DECODER = json.JSONDecoder(parse_int=_bounded_int)


def load_json(data: bytes | str):
    """Parse JSON text by Fleet's rules: UnstorableJSON (a WireError) names the first value that breaks one.

    Refused: text that is not UTF-8 or not JSON, NaN/Infinity (and numbers too large for a
    float), integers outside signed 64 bits, strings (keys included) holding a NUL byte or a
    lone surrogate, and nesting deeper than MAX_JSON_DEPTH.
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnstorableJSON("", f"not UTF-8: byte {exc.object[exc.start]:#04x} at position {exc.start}") from None
    try:
        document = _STRICT_DECODER.decode(data)
    except RecursionError:
        raise UnstorableJSON("", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # json.JSONDecodeError among them
        raise UnstorableJSON("", f"not JSON: {exc}") from None
    # ASCII text without a \u escape holds no NUL (json refuses raw control characters) and no
    # surrogate: its strings need no look, which halves the walk over a telemetry batch.
    check_storable(document, strings=not data.isascii() or "\\u" in data)
    return document


def check_storable(document, strings: bool = True) -> None:
    """Raise UnstorableJSON naming the first value of `document` that `load_json` would refuse.

    Walks containers with a stack of its own, so a deep document cannot exhaust Python's. The
    usual values (ASCII text, finite floats) are passed inline: a telemetry batch holds thousands.
    `strings=False` skips looking into text known to be clean.
    """
    _check_scalar(document, ())
    pending = [(document, ())] if type(document) in _CONTAINERS and document else []
    while pending:
        node, path = pending.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise UnstorableJSON(_dotted(path), f"nested deeper than {MAX_JSON_DEPTH} levels")
        if type(node) is dict:
            items = node.items()
            for key in node if strings else ():
                if type(key) is str and (not key.isascii() or "\x00" in key):
                    _check_text(key, (*path, key.encode("unicode_escape").decode()), "a key")
        else:
            items = enumerate(node)
        for key, value in items:
            kind = type(value)
            if kind is str:
                if strings and (not value.isascii() or "\x00" in value):
                    _check_text(value, (*path, key), "text")
            elif kind is float:
                if value - value != 0.0:  # true of NaN and of ±Infinity only
                    _check_scalar(value, (*path, key))
            elif kind in _CONTAINERS:
                if value:
                    pending.append((value, (*path, key)))
            elif kind is not bool and value is not None:
                _check_scalar(value, (*path, key))


_CONTAINERS = frozenset((dict, list, tuple))
_INFINITY = float("inf")


def _check_scalar(value, path: tuple) -> None:
    """UnstorableJSON if the scalar `value` at `path` breaks a rule (containers are the walk's)."""
    kind = type(value)
    if kind is str:
        _check_text(value, path, "text")
    elif kind is float:
        if value != value or value in (_INFINITY, -_INFINITY):
            raise UnstorableJSON(_dotted(path), "NaN, Infinity and numbers beyond a float's range are not JSON numbers")
    elif kind is _OutOfRange:
        raise UnstorableJSON(_dotted(path), f"an integer of {value.digits} digits is outside signed 64 bits")
    elif kind is int and not _INT_MIN <= value <= _INT_MAX:
        raise UnstorableJSON(_dotted(path), "an integer outside signed 64 bits")


def _check_text(text: str, path: tuple, what: str) -> None:
    found = _UNSTORABLE_CHARACTER.search(text)
    if found is not None:
        character = found.group()
        problem = "a NUL byte" if character == "\x00" else (
            f"a lone surrogate ({character.encode('unicode_escape').decode()})")
        raise UnstorableJSON(_dotted(path), f"{what} holding {problem}, which cannot be stored")


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


# --- Values that reach the device's filesystem or engine ---
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
        raise ValidationError(f"not a registry address ([https://]host[:port]){_registry_url_flaw(url)}")


def _registry_url_flaw(url) -> str:
    """Why a refused registry address is refused, when a common mistake explains it (else nothing)."""
    if not isinstance(url, str):
        return ""
    scheme, has_scheme, rest = url.partition("://")
    if has_scheme and scheme not in ("http", "https"):
        return f": the scheme {scheme!r} is neither http nor https"
    rest = rest if has_scheme else url
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        return ": credentials belong in the registry's username and password, not in its address"
    if "#" in rest:
        return ": an address has no fragment (#...)"
    if "?" in rest:
        return ": an address has no query (?...)"
    if rest.rstrip("/") != authority:
        return ": an address has no path (Docker names images under host[:port] alone)"
    return ""


# --- Topics -----------------------------------------------------------------

def device_topic(unit_id: str, kind: str) -> str:
    return f"{TOPIC_ROOT}/{unit_id}/{kind}"


def release_topic(unit_id: str, project_id: int) -> str:
    return f"{TOPIC_ROOT}/{unit_id}/releases/{project_id}"


def release_subscription(unit_id: str) -> str:
    return f"{TOPIC_ROOT}/{unit_id}/releases/+"


def shared_subscription(kind: str, group: str = SHARED_GROUP) -> str:
    """The subscription every server process shares, so each report is handled once."""
    return f"$share/{group}/{TOPIC_ROOT}/+/{kind}"


_TOPIC = re.compile(
    r"^" + re.escape(TOPIC_ROOT) + r"/(?P<unit_id>[0-9a-fA-F-]{36})/(?P<kind>[a-z]+)(?:/(?P<rest>[0-9]+))?$"
)


@dataclass(frozen=True)
class DeviceTopic:
    unit_id: str
    kind: str
    project_id: int | None = None


def parse_topic(topic: str) -> DeviceTopic:
    match = _TOPIC.match(topic)
    if not match:
        raise WireError(f"topic {topic!r} is not a device topic")
    rest = match["rest"]
    if match["kind"] == "releases":
        if rest is None:
            raise WireError(f"topic {topic!r} names no project")
        return DeviceTopic(match["unit_id"].lower(), "releases", int(rest))
    if rest is not None:
        raise WireError(f"topic {topic!r} has an unexpected suffix")
    return DeviceTopic(match["unit_id"].lower(), match["kind"])


# --- Payloads ---------------------------------------------------------------

class _Message(Schema):
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


class ReleaseMessageSchema(_Message):
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


class DeploymentReportSchema(_Message):
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


class ReleaseSeqMarkerSchema(_Message):
    """server → server, retained on RELEASE_SEQ_MARKER_TOPIC: the highest release seq the broker acknowledged."""

    seq = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))


class StatusSchema(_Message):
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


# --- Telemetry (device → server) --------------------------------------------

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


class TelemetryBatchSchema(_Message):
    """device → server: readings the device buffered, sent once per `batch_id`.

    `dropped` counts the readings the device's full buffer has discarded since it was created.
    """

    batch_id = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{32}$"))
    dropped = fields.Integer(load_default=0, validate=validate.Range(min=0))
    readings = ReadingList(required=True)


telemetry_batch = TelemetryBatchSchema()


def telemetry_payload(batch_id: str, dropped: int, readings_json: list[str]) -> bytes:
    """A telemetry batch assembled from readings already checked by `check_reading` and stored as JSON.

    The device buffers readings as JSON text; joining them avoids decoding and checking each
    one a second time on every (re)send.
    """
    if not readings_json or len(readings_json) > MAX_BATCH_READINGS:
        raise WireError(f"a batch holds 1 to {MAX_BATCH_READINGS} readings, not {len(readings_json)}")
    head = json.dumps({"v": PROTOCOL_VERSION, "batch_id": batch_id, "dropped": int(dropped)}, separators=(",", ":"))
    return f'{head[:-1]},"readings":[{",".join(readings_json)}]}}'.encode()


# --- Remote commands (server → device on `commands`, device → server on `results`) ---
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


def command_rank(state: str) -> int:
    """Order of the command states: a report never moves a command back to an earlier one."""
    if state in FINAL_COMMAND_STATES:
        return 3
    return COMMAND_STATES.index(state)


class CommandMessageSchema(_Message):
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

    def load_usual(self, document: dict) -> dict | None:
        """A message in the server's own form checked by plain code: what `load` would give, or None."""
        if document.keys() != _COMMAND_KEYS:
            return None
        version, command_id, name, arg, kwarg, timeout, deadline = (
            document["v"], document["id"], document["command"], document["arg"], document["kwarg"],
            document["timeout"], document["deadline"])
        if (type(version) is not int or version != PROTOCOL_VERSION
                or type(command_id) is not str or not _CANONICAL_UUID.match(command_id)
                or type(name) is not str or not 1 <= len(name) <= 200
                or type(arg) is not list
                or type(kwarg) is not dict or not all(type(key) is str for key in kwarg)
                or not (timeout is None or (_plain_number(timeout) and 0 < timeout <= MAX_COMMAND_TIMEOUT))
                or not _plain_number(deadline)):
            return None
        return {"v": version, "id": uuid.UUID(command_id), "command": name, "arg": list(arg), "kwarg": dict(kwarg),
                "timeout": None if timeout is None else float(timeout), "deadline": float(deadline)}


def command_payload(command_id: str, command: str, arg: list, kwarg: dict, timeout: float | None,
                    deadline: float) -> bytes:
    """The command message for values the server has already checked against the same bounds.

    What `encode(command_message, ...)` gives, byte for byte, without checking the values a
    second time: the schema's check costs fifteen times the encoding, on the path between a
    command's creation and its publication. The server's CommandCreateSchema holds the same
    limits (name, arg list, kwarg object with string keys, timeout range), and its ids are UUIDs.
    """
    return json.dumps({"arg": arg, "command": command, "deadline": float(deadline), "id": command_id,
                       "kwarg": kwarg, "timeout": timeout, "v": PROTOCOL_VERSION},
                      separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


class CommandResultSchema(_Message):
    """device → server: the state of one command; a final state carries its return value or error."""

    id = fields.UUID(required=True)
    state = fields.String(required=True, validate=validate.OneOf(COMMAND_REPORT_STATES))
    return_value = fields.Raw(data_key="return", load_default=None, allow_none=True)
    error = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=MAX_COMMAND_ERROR))
    truncated = fields.Boolean(load_default=False)
    started_at = fields.Float(load_default=None, allow_none=True)
    finished_at = fields.Float(load_default=None, allow_none=True)
    ts = fields.Float(required=True)

    def load_usual(self, document: dict) -> dict | None:
        """The usual report (plain JSON types, every value valid) checked by plain code, which costs
        a tenth of `load`: the dict `load` would give, or None for anything else, left to `load`
        (which accepts the rarer spellings, such as numbers as strings, and names what is wrong)."""
        identifier, state, error = document.get("id"), document.get("state"), document.get("error")
        truncated = document.get("truncated", False)
        if (document.get("v") != PROTOCOL_VERSION or type(document.get("v")) is not int
                or type(identifier) is not str or type(state) is not str or state not in COMMAND_REPORT_STATES
                or type(truncated) is not bool
                or not (error is None or (type(error) is str and len(error) <= MAX_COMMAND_ERROR))):
            return None
        sent = [document.get(name) for name in ("ts", "started_at", "finished_at")]
        if sent[0] is None or not all(value is None or _plain_number(value) for value in sent):
            return None
        ts, started_at, finished_at = [None if value is None else float(value) for value in sent]
        try:
            identifier = uuid.UUID(identifier)
        except ValueError:
            return None
        return {"v": PROTOCOL_VERSION, "id": identifier, "state": state, "return_value": document.get("return"),
                "error": error, "truncated": truncated, "started_at": started_at, "finished_at": finished_at,
                "ts": ts}

    def is_usual(self, result: dict) -> bool:
        """Whether a result in the agent's own form is valid, checked by plain code (see `encode`)."""
        return (result.keys() == _RESULT_KEYS
                and type(result["id"]) is str and _CANONICAL_UUID.match(result["id"]) is not None
                and type(result["state"]) is str and result["state"] in _REPORT_STATES
                and (result["error"] is None
                     or (type(result["error"]) is str and len(result["error"]) <= MAX_COMMAND_ERROR))
                and type(result["truncated"]) is bool
                and (result["started_at"] is None or _plain_number(result["started_at"]))
                and (result["finished_at"] is None or _plain_number(result["finished_at"]))
                and _plain_number(result["ts"]))


command_message = CommandMessageSchema()
command_result = CommandResultSchema()

# The command path's quick checks (`load_usual`, `is_usual` above): the schemas cost ~50 µs a
# message each way in marshmallow, as much as the rest of a ping's handling on the agent and
# of a result's on the worker. A message in the form the server writes and a result in the
# form the agent builds are checked by plain code instead; each check accepts only what the
# schema accepts and gives the same value (tested against the schema), and anything else goes
# through the schema, which accepts the rarer spellings or names what is wrong.

_CANONICAL_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_COMMAND_KEYS = frozenset(("v", "id", "command", "arg", "kwarg", "timeout", "deadline"))
_RESULT_KEYS = frozenset(("id", "state", "return", "error", "truncated", "started_at", "finished_at", "ts"))
_REPORT_STATES = frozenset(COMMAND_REPORT_STATES)
_EXACT_INT = 2 ** 53  # an int beyond this is left to the schema (float() would round or overflow)


def _plain_number(value) -> bool:
    """A finite float, or an int a float holds exactly (what fields.Float takes without question)."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -_EXACT_INT <= value <= _EXACT_INT


# --- Confirmations (server → device) -----------------------------------------
#
# A report counts as delivered once the server has stored it, not once the broker took it:
# a broker that restarts can acknowledge a report and drop it before any worker is
# subscribed again. So the device keeps each report until a confirmation names it, and
# sends it again after a reconnect and periodically; storing a report twice changes nothing.

MAX_CONFIRMED_IDS = 1000


class ConfirmationSchema(_Message):
    """server → device on `confirmations`, QoS 1, not retained: reports the server is done with.

    `ids` names each report stored (or refused for good, so the device stops resending it):
    a deployment report or status by its `rid`, a telemetry batch by its `batch_id`, a
    command's final result by the command's `id`.
    """

    ids = fields.List(fields.String(validate=validate.Length(min=1, max=64)), load_default=list,
                      validate=validate.Length(max=MAX_CONFIRMED_IDS))


confirmation = ConfirmationSchema()


def confirmation_id(kind: str, payload: bytes) -> str | None:
    """The id a confirmation names the report on a `kind` topic by, read leniently from its payload.

    None when it has none: an older device's report, or one that is not a JSON object.
    Read without the report's schema so that a report the server refused is confirmed too.
    """
    try:
        document = json.loads(payload) if len(payload) <= MAX_PAYLOAD_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if kind == "telemetry":
        identity = document.get("batch_id")
    elif kind == "results":
        # Only a final result is kept until confirmed; progress reports are sent once.
        identity = document.get("id") if document.get("state") in FINAL_COMMAND_STATES else None
    else:
        identity = document.get("rid")
    return identity if isinstance(identity, str) and 0 < len(identity) <= 64 else None


def confirmation_payload(ids: list[str]) -> bytes:
    return encode(confirmation, {"ids": list(ids)})


# --- Container parameters both sides interpret the same way -----------------

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_environment(text: str) -> dict[str, str]:
    """Parse AutoPi's environment string (`KEY='value' OTHER=x`) shell-style.

    Raises WireError naming the first word that is not KEY=VALUE.
    """
    import shlex

    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise WireError(f"environment cannot be parsed: {exc}") from None
    environment = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise WireError(f"environment entry {word!r} is not KEY=VALUE")
        environment[key] = value
    return environment
