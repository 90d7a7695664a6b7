"""Confirmations (server → device): which reports the server is done with."""
from __future__ import annotations

import json
from typing import Annotated

import msgspec

from .commands import FINAL_COMMAND_STATES
from .messages import Message
from .protocol import MAX_PAYLOAD_BYTES

#
# A report counts as delivered once the server has stored it, not once the broker took it:
# a broker that restarts can acknowledge a report and drop it before any worker is
# subscribed again. So the device keeps each report until a confirmation names it, and
# sends it again after a reconnect and periodically; storing a report twice changes nothing.

MAX_CONFIRMED_IDS = 1000


class Confirmation(Message, frozen=True, kw_only=True):
    """server → device on `confirmations`, QoS 1, not retained: reports the server is done with.

    `ids` names each report stored (or refused for good, so the device stops resending it):
    a deployment report or status by its `rid`, a telemetry batch by its `batch_id`, a
    command's final result by the command's `id`.
    """

    ids: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]],
                   msgspec.Meta(max_length=MAX_CONFIRMED_IDS)] = []


def confirmation_id(kind: str, payload: bytes) -> str | None:
    """The id a confirmation names the report on a `kind` topic by, read leniently from its payload.

    None when it has none: an older device's report, or one that is not a JSON object.
    Read without the report's type so that a report the server refused is confirmed too.
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
