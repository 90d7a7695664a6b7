"""Remote commands: server → device on `commands`, device → server on `results`."""
from __future__ import annotations

import json
import math
import re
import uuid

from marshmallow import fields, validate

from .messages import Message
from .protocol import PROTOCOL_VERSION

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
