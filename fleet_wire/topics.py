"""MQTT topic names: building them, and parsing the ones devices publish on."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .protocol import SHARED_GROUP, TOPIC_ROOT, WireError

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
