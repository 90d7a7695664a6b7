"""Remote commands: server → device on `commands`, device → server on `results`."""
from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec

from .grammar import CommandName
from .messages import Message, check_free_form

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


class CommandMessage(Message, frozen=True, kw_only=True):
    """server → device: run `command` with `arg`/`kwarg` once, unless `deadline` (epoch seconds) passed.

    `timeout` is null when the device should use the command's own default.
    """

    id: uuid.UUID
    command: CommandName
    arg: list[Any] = []
    kwarg: dict[str, Any] = {}
    timeout: Annotated[float, msgspec.Meta(gt=0, le=MAX_COMMAND_TIMEOUT)] | None = None
    deadline: float

    def __post_init__(self):
        check_free_form("arg", self.arg)
        check_free_form("kwarg", self.kwarg)


class CommandResult(Message, frozen=True, kw_only=True):
    """device → server: the state of one command; a final state carries its return value or error."""

    id: uuid.UUID
    state: Literal[COMMAND_REPORT_STATES]
    return_value: Any = msgspec.field(default=None, name="return")
    error: Annotated[str, msgspec.Meta(max_length=MAX_COMMAND_ERROR)] | None = None
    truncated: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    ts: float

    def __post_init__(self):
        check_free_form("return", self.return_value)


