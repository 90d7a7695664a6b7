"""Every message's common part, encode and decode; release documents, deployment reports and status."""
from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import msgspec

from .grammar import ContainerName, StartupParameters, check_field, check_registry_url, whole
from .protocol import INT64_MAX, INT64_MIN, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, WireError
from .strict_json import MAX_JSON_DEPTH, UnstorableJSON, check_storable, load_json

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

# What a BIGINT column stores: every integer on the wire fits one.
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
# A report's own id (`rid`), which the server's confirmation names: short, opaque, chosen by the device.
ReportId = Annotated[str, msgspec.Meta(pattern=whole(r"^[0-9A-Za-z_-]{1,64}$"))]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Every payload carries the protocol version it was written for; fields a side does not know are ignored."""

    v: Literal[1] = PROTOCOL_VERSION


class RegistryCredentials(msgspec.Struct, frozen=True, kw_only=True):
    """A registry the device logs in to before pulling the images of the release that names it."""

    id: Int64
    url: str
    username: str = ""
    password: str = ""

    def __post_init__(self):
        check_field("url", check_registry_url, self.url)


class ContainerSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: ContainerName
    image: Annotated[str, msgspec.Meta(min_length=1)]
    tag: Annotated[str, msgspec.Meta(min_length=1)]
    required_tags: list[str] = []
    startup_parameters: StartupParameters = msgspec.field(default_factory=StartupParameters)
    purge_data: bool = False
    registry: Int64 | None = None
    fully_qualified_name: ContainerName


class ReleaseSpec(msgspec.Struct, frozen=True, kw_only=True):
    id: Int64
    version: str
    version_hash: Annotated[str, msgspec.Meta(pattern=whole(r"^[0-9a-f]{8}$"))]
    containers: list[ContainerSpec]
    remove_containers: list[ContainerName] = []


class ReleaseMessage(Message, frozen=True, kw_only=True):
    """server → device, retained: the device's active release of one project.

    `release` is null in a tombstone: the project has nothing on this device any more.
    `seq` grows with every publication on any release topic (one database sequence): a device
    ignores a document with a lower seq than it has seen for the project. Optional: a server
    older than the field sends none, and such a document is accepted as it always was.
    """

    seq: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] | None = None
    project_id: Int64
    release: ReleaseSpec | None
    registries: list[RegistryCredentials] = []


class DeploymentReport(Message, frozen=True, kw_only=True):
    """device → server: progress of one release on the reporting device.

    `rid` (optional) names the report in the server's confirmation; a device resends the
    report until it is confirmed, so the server may receive it more than once.
    """

    rid: ReportId | None = None
    project_id: Int64
    release_id: Int64
    version_hash: str | None = None
    # A state this side does not know (a newer agent's) is recorded as sent: see check_deployment_state.
    state: str
    step: str | None = None
    detail: Annotated[str, msgspec.Meta(max_length=4000)] = ""
    ts: float

    def __post_init__(self):
        check_field("state", check_deployment_state, self.state)


def check_deployment_state(state: str) -> None:
    """A known state, or a word a newer agent may use (lowercase, at most 20 characters); never the server's own."""
    if state in SERVER_DEPLOYMENT_STATES:
        raise WireError(f"{state!r} is a state only the server records")
    if state not in DEPLOYMENT_STATES and not _STATE_WORD.match(state):
        raise WireError(f"{state!r} is not a deployment state (lowercase letters and _, at most 20)")


class ReleaseSeqMarker(Message, frozen=True, kw_only=True):
    """server → server, retained on RELEASE_SEQ_MARKER_TOPIC: the highest release seq the broker acknowledged."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class Status(Message, frozen=True, kw_only=True):
    """device → server, retained with a last will: is the agent online. `rid` as in a deployment report."""

    rid: ReportId | None = None
    state: Literal["online", "offline"]
    agent_version: str | None = None
    ts: float | None = None


def check_free_form(name: str, value) -> None:
    """A field of any JSON value (a command's arguments, its return value) by `load_json`'s rules.

    msgspec refuses NaN, lone surrogates and invalid text itself; integers beyond 64 bits, NUL
    bytes and deep nesting can only hide in these fields, whose type says nothing of them.
    """
    if value is not None and type(value) not in _PLAIN_SCALARS:
        try:
            check_storable({name: value})
        except UnstorableJSON as exc:
            raise WireError(str(exc)) from None


_PLAIN_SCALARS = frozenset((str, bool))  # a NUL in text is found by decode; a float may be NaN


M = TypeVar("M", bound=msgspec.Struct)
_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[type, msgspec.json.Decoder] = {}


def encode(message: msgspec.Struct) -> bytes:
    """A message's payload, after checking it as the receiving side will (WireError names what is wrong)."""
    try:
        payload = _ENCODER.encode(message)
    except (TypeError, ValueError, OverflowError) as exc:  # a lone surrogate among them (UnicodeEncodeError)
        raise WireError(f"outgoing {type(message).__name__} is not JSON: {exc}") from None
    try:
        # Struct constraints are checked when decoding, not when building: read what was
        # written, so that nothing the other side would refuse (NaN written as null) is sent.
        decode(type(message), payload)
    except WireError as exc:
        raise WireError(f"outgoing {type(message).__name__} is invalid: {exc}") from None
    return payload


def decode(kind: type[M], payload: bytes) -> M:
    """Parse and validate a payload into a `kind` message, by strict JSON's rules; WireError names what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        message = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise WireError(f"payload is invalid: {explained(exc)}") from None
    except msgspec.DecodeError as exc:
        raise WireError(f"payload refused: {_why_not_json(payload, exc)}") from None
    except RecursionError:
        raise WireError(f"payload refused: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if b"\\u0000" in payload:  # a NUL byte, which no text field may hold (or an escaped backslash before u0000)
        _refuse_unstorable(payload)
    return message


def from_builtins(kind: type[M], fields: dict) -> M:
    """A `kind` message from plain values (a dict by field name, as JSON spells it), checked by its types and
    constraints; what only the JSON text can show (NaN, a NUL byte) is checked when it is encoded."""
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise WireError(explained(exc)) from None


_MISSING_FIELD = re.compile(r"Object missing required field `(.+)`")
_NAMED = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*: ")


def explained(error: msgspec.ValidationError) -> str:
    """msgspec's error as `path: what is wrong` (`readings[3].value: ...`), the path first as Fleet's errors put it.

    msgspec ends its text with ` - at `$.path``; a check of our own already starts with its field's name.
    """
    text, at, where = str(error).rpartition(" - at `")
    if not at:  # at the top level, msgspec names no place
        text, where = str(error), ""
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    missing = _MISSING_FIELD.fullmatch(text)
    if missing:
        text, path = "a required field is missing", f"{path}.{missing[1]}" if path else missing[1]
    if not path:
        return text
    return f"{path}.{text}" if _NAMED.match(text) else f"{path}: {text}"


def _why_not_json(payload: bytes, error: msgspec.DecodeError) -> str:
    """`load_json`'s explanation of text msgspec refused (it names the value at fault), else msgspec's."""
    try:
        load_json(payload)
    except UnstorableJSON as exc:
        return str(exc)
    return str(error)


def _refuse_unstorable(payload: bytes) -> None:
    try:
        load_json(payload)
    except UnstorableJSON as exc:
        raise WireError(f"payload refused: {exc}") from None
