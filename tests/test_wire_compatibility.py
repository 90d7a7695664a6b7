"""Old and new speak to each other: messages written by the previous agent and server (tests/data/wire_v1,
captured before the wire moved to msgspec) decode to the values the previous decoders gave, and the
previous decoders (tests/support/wire_v1_reference.py, frozen) accept what the new encoder writes.

Values are compared, not bytes: the new encoder writes non-ASCII text as UTF-8 where json.dumps escaped it,
and fields in declaration order rather than sorted.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import msgspec
import pytest

import fleet_wire as wire
from tests.support import wire_v1_reference as v1

DATA = Path(__file__).parent / "data" / "wire_v1"
DECODED = json.loads((DATA / "decoded.json").read_text(encoding="utf-8"))

# The previous decoder of each kind (by the name the capture recorded), and the Struct that replaces it.
KINDS = {
    "release_message": (v1.release_message, wire.ReleaseMessage),
    "release_seq_marker": (v1.release_seq_marker, wire.ReleaseSeqMarker),
    "deployment_report": (v1.deployment_report, wire.DeploymentReport),
    "status_message": (v1.status_message, wire.Status),
    "telemetry_batch": (v1.telemetry_batch, wire.TelemetryBatch),
    "command_message": (v1.command_message, wire.CommandMessage),
    "command_result": (v1.command_result, wire.CommandResult),
    "confirmation": (v1.confirmation, wire.Confirmation),
}


def values(value):
    """A decoded message as plain values by field name (a Struct's attribute names, a UUID as text)."""
    if isinstance(value, msgspec.Struct):
        return {name: values(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {key: values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [values(item) for item in value]
    return value


def test_every_kind_of_message_was_captured():
    assert {case["schema"] for case in DECODED.values()} == set(KINDS)
    assert {"release_tombstone", "deployment_report_without_rid", "status_offline_will"} <= DECODED.keys()
    assert {name for name in DECODED if name.startswith("result_")} == {
        f"result_{state}" for state in wire.COMMAND_REPORT_STATES}
    readings = json.loads((DATA / "telemetry.json").read_bytes())["readings"]
    assert {reading["type"] for reading in readings} == set(wire.TELEMETRY_TYPES)


@pytest.mark.parametrize("name", sorted(DECODED))
def test_a_message_of_the_previous_code_decodes_to_the_values_the_previous_decoder_gave(name):
    _old, kind = KINDS[DECODED[name]["schema"]]
    decoded = wire.decode(kind, (DATA / f"{name}.json").read_bytes())
    assert values(decoded) == DECODED[name]["decoded"]


@pytest.mark.parametrize("name", sorted(DECODED))
def test_the_previous_decoder_reads_what_the_new_encoder_writes_as_the_same_values(name):
    old, kind = KINDS[DECODED[name]["schema"]]
    payload = wire.encode(wire.decode(kind, (DATA / f"{name}.json").read_bytes()))
    assert v1.plain(v1.decode(old, payload)) == DECODED[name]["decoded"]


def test_non_ascii_text_is_written_as_utf8_and_read_as_the_same_text_by_both():
    release = wire.decode(wire.ReleaseMessage, (DATA / "release.json").read_bytes())
    payload = wire.encode(release)
    assert "2.4.1 – Früh".encode() in payload  # json.dumps wrote \u2013 and \u00fc
    assert v1.decode(v1.release_message, payload)["release"]["version"] == "2.4.1 – Früh"


def test_messages_built_by_the_new_code_are_read_by_the_previous_decoders():
    """Messages as the server and agent now build them, field by field (not read from a capture)."""
    command_id = uuid.uuid4()
    built = [
        (v1.command_message, wire.CommandMessage(id=command_id, command="docker.logs", arg=["web"],
                                                 kwarg={"tail": 5}, deadline=2e9)),
        (v1.command_result, wire.CommandResult(id=command_id, state="succeeded", return_value={"ok": [1, 2]},
                                               started_at=1.5, finished_at=2, ts=3)),
        (v1.status_message, wire.Status(state="offline", agent_version="1.0")),
        (v1.deployment_report, wire.DeploymentReport(rid="r-1", project_id=1, release_id=2, state="queued", ts=4)),
        (v1.telemetry_batch, wire.TelemetryBatch(batch_id=uuid.uuid4().hex, readings=[
            wire.Reading(field="speed", type="float", ts=5, value=7),
            wire.Reading(field="loc", type="geo_point", ts=5, value=wire.GeoPoint(lat=1, lon=2))])),
        (v1.confirmation, wire.Confirmation(ids=["a", "b"])),
        (v1.release_seq_marker, wire.ReleaseSeqMarker(seq=0)),
        (v1.release_message, wire.ReleaseMessage(project_id=3, release=None)),
    ]
    for old, message in built:
        decoded = v1.decode(old, wire.encode(message))
        assert v1.plain(decoded) == values(wire.decode(type(message), wire.encode(message))), type(message)


# Odd values for any field: what a buggy or hostile peer might send instead of the usual one.
ODD_VALUES = [None, True, False, 0, 1, -1, 1.0, 2.5, 2 ** 63, 1e308, "", "1.5", "1", "x" * 5000, [], {}, [None],
              "succeeded", "running", "queued", "online", "0F1E2D3C4B5A69788796A5B4C3D2E1F0",
              "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", "not-a-uuid", "e" * (wire.MAX_COMMAND_ERROR + 1)]


def _variants(document: dict, count: int, rng):
    """`document` with one to three fields changed to odd values or removed (never `v`, which the new code
    defaults and the old required), or an unknown one added."""
    for _ in range(count):
        variant = dict(document)
        for _change in range(rng.randint(1, 3)):
            key = rng.choice([*document.keys() - {"v"}, "unknown"])
            if rng.random() < 0.25:
                variant.pop(key, None)
            else:
                variant[key] = rng.choice(ODD_VALUES)
        yield variant


@pytest.mark.parametrize("name", ["command", "result_succeeded", "result_running", "deployment_report",
                                  "status_online", "confirmation", "release_seq_marker"])
def test_what_the_new_decoder_accepts_the_previous_one_accepted_as_the_same_values(name):
    """The new decoders are never laxer than the previous ones, on variants good and bad: a message the new
    code accepts, the previous code accepted too and read as the same values (so no peer sees a difference)."""
    import random

    old, kind = KINDS[DECODED[name]["schema"]]
    document = json.loads((DATA / f"{name}.json").read_bytes())
    accepted = 0
    for variant in _variants(document, 400, random.Random(name)):
        payload = json.dumps(variant).encode()
        try:
            new = values(wire.decode(kind, payload))
        except wire.WireError:
            continue
        accepted += 1
        assert v1.plain(v1.decode(old, payload)) == new, variant
    assert accepted > 0
