"""The usual command result is checked by plain code; it must accept and give exactly what the schema does."""
import json
import math
import random
import uuid

import pytest
from marshmallow import ValidationError

import fleet_wire as wire

USUAL = {"v": 1, "id": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "state": "succeeded", "return": {"ok": [1, None]},
         "error": None, "truncated": False, "started_at": 1700000000.25, "finished_at": 1700000001, "ts": 1700000001.5}
ODD_VALUES = [None, True, False, 0, 1, -1, 1.0, 2**63, 10**400, 1e308, "", "1.5", "1", "x" * 5000, [], {}, [None],
              "NaN", "succeeded", "running", "expired", "queued", "0F1E2D3C4B5A69788796A5B4C3D2E1F0",
              "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", "not-a-uuid", "e" * (wire.MAX_COMMAND_ERROR + 1)]


def _schema_outcome(payload: bytes):
    """What the strict JSON loader and the schema alone make of a payload: the loaded dict, or the WireError's text."""
    try:
        document = wire.load_json(payload)
    except wire.UnstorableJSON as exc:
        return f"payload refused: {exc}"
    try:
        return wire.command_result.load(document)
    except ValidationError as exc:
        return f"payload is invalid: {exc.messages}"


def _decoded(payload: bytes):
    try:
        return wire.decode(wire.command_result, payload)
    except wire.WireError as exc:
        return str(exc)


def _variants(count: int, rng: random.Random):
    for _ in range(count):
        document = dict(USUAL)
        for _change in range(rng.randint(1, 3)):
            key = rng.choice([*USUAL, "unknown"])
            if rng.random() < 0.25:
                document.pop(key, None)
            else:
                document[key] = rng.choice(ODD_VALUES)
        yield document


def test_the_usual_report_takes_the_plain_path_and_gives_what_the_schema_gives():
    loaded = wire.command_result.load_usual(dict(USUAL))
    assert loaded is not None and loaded == wire.command_result.load(dict(USUAL))
    assert loaded["id"] == uuid.UUID(USUAL["id"]) and loaded["finished_at"] == 1700000001.0
    assert type(loaded["finished_at"]) is float


@pytest.mark.parametrize("rng_state", range(4))
def test_any_report_decodes_to_exactly_what_the_schema_makes_of_it(rng_state):
    """Whatever the plain check takes gives the schema's dict; whatever it leaves goes to the schema,
    which accepts the rarer spellings or names what is wrong."""
    rng = random.Random(rng_state)
    for document in _variants(500, rng):
        payload = json.dumps(document).encode()
        assert _decoded(payload) == _schema_outcome(payload), document


@pytest.mark.parametrize("ts", [math.inf, -math.inf, math.nan])
def test_a_non_finite_time_is_refused_as_the_schema_refuses_it(ts):
    payload = json.dumps({**USUAL, "ts": ts}).encode()  # Python's json writes Infinity and NaN, and reads them
    assert wire.command_result.load_usual(json.loads(payload)) is None
    with pytest.raises(wire.WireError, match="ts"):
        wire.decode(wire.command_result, payload)
