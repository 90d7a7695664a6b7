"""The quick checks of the command path (`load_usual`, `is_usual`) give exactly what the wire schemas give.

`wire.decode` and `wire.encode` try a schema's quick check of its usual message first and leave
everything else to `CommandMessageSchema`/`CommandResultSchema`; these tests hold them to the
schemas alone on generated documents, good and bad alike (pure logic: no broker needed).
"""
import json
import math
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fleet_wire as wire

_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)
_NUMBERS = (st.floats() | st.integers() | st.integers(min_value=2 ** 53 - 2, max_value=2 ** 53 + 2)
            | st.sampled_from([0, 0.0, -1, 1e-9, 30, 30.5, wire.MAX_COMMAND_TIMEOUT, wire.MAX_COMMAND_TIMEOUT + 1,
                               10 ** 400, True, False, "30", None]))
_IDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"{{{u}}}"),
    st.uuids().map(lambda u: f"{u}\n"),
    st.sampled_from(["", "not-a-uuid", 5, None]),
)


_VALID_NUMBERS = st.floats(allow_nan=False, allow_infinity=False, min_value=1e-6, max_value=wire.MAX_COMMAND_TIMEOUT) \
    | st.integers(min_value=1, max_value=wire.MAX_COMMAND_TIMEOUT)


@st.composite
def command_documents(draw):
    """Each field usually as the server writes it, otherwise anything at all (or missing)."""
    document = {}
    for key, usual, odd in (
        ("v", st.just(1), st.sampled_from([1.0, 2, "1", True, None])),
        ("id", st.uuids().map(str), _IDS),
        ("command", st.text(min_size=1, max_size=200), st.one_of(st.just(""), st.just("x" * 201), st.integers())),
        ("arg", st.lists(_ANY_JSON, max_size=3), _ANY_JSON),
        ("kwarg", st.dictionaries(st.text(max_size=3), _ANY_JSON, max_size=3), _ANY_JSON),
        ("timeout", st.none() | _VALID_NUMBERS, _NUMBERS),
        ("deadline", _VALID_NUMBERS, _NUMBERS),
    ):
        chance = draw(st.integers(0, 19))
        if chance:  # now and then a key is missing
            document[key] = draw(usual if chance > 3 else odd)
    if draw(st.integers(0, 9)) == 0:
        document["extra"] = draw(_ANY_JSON)
    return document


# The same schemas (same names, so the same error texts) without their quick checks: the schema alone.
_COMMAND_SCHEMA_ALONE = type("CommandMessageSchema", (wire.CommandMessageSchema,), {"load_usual": None})()
_RESULT_SCHEMA_ALONE = type("CommandResultSchema", (wire.CommandResultSchema,), {"is_usual": None})()


def _decoded_by_schema(payload):
    try:
        return wire.decode(_COMMAND_SCHEMA_ALONE, payload)
    except wire.WireError as exc:
        return exc


def _decoded_quickly(payload):
    try:
        return wire.decode(wire.command_message, payload)
    except wire.WireError as exc:
        return exc


def _same(quick, schema):
    if isinstance(schema, wire.WireError):
        assert isinstance(quick, wire.WireError) and str(quick) == str(schema)
    else:
        assert quick == schema and type(quick["id"]) is uuid.UUID
        assert all(type(quick[k]) is type(schema[k]) for k in schema)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_documents())
def test_a_command_decodes_quickly_to_exactly_what_the_schema_gives_or_fails_the_same(document):
    payload = json.dumps(document).encode()
    _same(_decoded_quickly(payload), _decoded_by_schema(payload))


def _server_command(**changes):
    body = {"v": 1, "id": str(uuid.uuid4()), "command": "test.ping", "arg": [], "kwarg": {}, "timeout": None,
            "deadline": 1_900_000_000.25, **changes}
    return json.dumps(body).encode()


@pytest.mark.parametrize("payload", [
    _server_command(),
    _server_command(timeout=30, arg=["web", 3], kwarg={"tail": 10}),
    _server_command(timeout=0),
    _server_command(timeout=float("nan")),
    _server_command(deadline=float("inf")),
    _server_command(id=str(uuid.uuid4()).upper()),
    _server_command(kwarg={"tail": None}, arg=[None]),
    b"[1]", b"not json", b"\xff", b'{"v": 1}', b"{}",
    b'{"v":1,' + b'"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b" " * (wire.MAX_PAYLOAD_BYTES + 1),
])
def test_usual_and_awkward_commands_decode_as_the_schema_decodes_them(payload):
    _same(_decoded_quickly(payload), _decoded_by_schema(payload))


@st.composite
def results(draw):
    """Each field usually as the agent builds it, otherwise anything at all (or missing)."""
    time_or_none = st.none() | _VALID_NUMBERS
    result = {}
    for key, usual, odd in (
        ("id", st.uuids().map(str), _IDS),
        ("state", st.sampled_from(wire.COMMAND_REPORT_STATES), st.sampled_from(["queued", "done", 3, None])),
        ("return", _ANY_JSON, st.just(object())),
        ("error", st.none() | st.text(max_size=5) | st.just("e" * wire.MAX_COMMAND_ERROR),
         st.just("e" * (wire.MAX_COMMAND_ERROR + 1)) | st.integers()),
        ("truncated", st.booleans(), st.sampled_from([0, 1, "yes", None])),
        ("started_at", time_or_none, _NUMBERS),
        ("finished_at", time_or_none, _NUMBERS),
        ("ts", _VALID_NUMBERS, _NUMBERS),
    ):
        chance = draw(st.integers(0, 19))
        if chance:
            result[key] = draw(usual if chance > 3 else odd)
    if draw(st.integers(0, 9)) == 0:
        result[draw(st.sampled_from(["v", "extra"]))] = draw(_ANY_JSON)
    return result


def _encoded(encode, result):
    try:
        return encode(result)
    except (wire.WireError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _result(**changes):
    return {"id": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "state": "succeeded", "return": True, "error": None,
            "truncated": False, "started_at": 1.5, "finished_at": 2.5, "ts": 3.5, **changes}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(results())
@example(_result(ts=math.nan))
@example(_result(ts=math.inf))
@example(_result(started_at=-math.inf))
@example(_result(finished_at="2.5"))
@example(_result(ts=2 ** 60))
def test_a_result_encodes_quickly_to_the_same_bytes_as_the_schema_or_fails_the_same(result):
    quick = _encoded(lambda r: wire.encode(wire.command_result, r), result)
    assert quick == _encoded(lambda r: wire.encode(_RESULT_SCHEMA_ALONE, r), result)


def test_the_agents_usual_result_takes_the_quick_path_and_round_trips_through_the_servers_schema(monkeypatch):
    result = {"id": str(uuid.uuid4()), "state": "succeeded", "return": {"a": [1, "é"]}, "error": None,
              "truncated": False, "started_at": 1.5, "finished_at": 2, "ts": 2.25}
    expected = wire.encode(_RESULT_SCHEMA_ALONE, result)
    monkeypatch.setattr(wire.command_result, "validate", lambda body: pytest.fail("the schema was consulted"))
    payload = wire.encode(wire.command_result, result)
    assert payload == expected
    assert wire.command_result.load(json.loads(payload))["return_value"] == {"a": [1, "é"]}


def test_a_result_the_schema_refuses_is_refused_naming_the_field():
    result = {"id": str(uuid.uuid4()), "state": "finished", "return": None, "error": None, "truncated": False,
              "started_at": None, "finished_at": None, "ts": math.pi}
    with pytest.raises(wire.WireError, match="state"):
        wire.encode(wire.command_result, result)
