"""Hostile JSON is refused where it is read, naming the value: by wire.load_json on MQTT, as a 400 over HTTP."""
import json
import math
import time
import uuid
from types import SimpleNamespace

import pytest

import fleet_wire as wire

from fleet_device import commands, logbuffer
from fleet_device.commands import CommandRunner
from fleet_device.mqtt import Received
from tests.support.stack import release_payload

DEEP = b"[" * 1000 + b"]" * 1000
HUGE_INT = b"9" * 5000


# --- the loader ---------------------------------------------------------------

@pytest.mark.parametrize("text, path, reason", [
    (b'{"name": "\\ud800"}', "name", "lone surrogate"),
    (b'{"a": {"b": ["ok", "\\udfff"]}}', "a.b.1", "lone surrogate"),
    (b'{"\\ud800": 1}', "\\ud800", "a key holding a lone surrogate"),
    (b'{"name": "a\\u0000b"}', "name", "NUL byte"),
    (b'{"arg": [Infinity, NaN]}', "arg.0", "NaN, Infinity"),
    (b'{"x": -Infinity}', "x", "NaN, Infinity"),
    (b'{"x": 1e400}', "x", "beyond a float's range"),
    (b'{"n": ' + HUGE_INT + b"}", "n", "5000 digits is outside signed 64 bits"),
    (b'{"n": 9223372036854775808}', "n", "outside signed 64 bits"),
    (b'{"n": -9223372036854775809}', "n", "outside signed 64 bits"),
    (DEEP, "", "nested deeper than 32 levels"),
    (b'{"a": ' * 33 + b"1" + b"}" * 33, ".".join(["a"] * 32), "nested deeper than 32 levels"),
    (b'"\\ud800"', "", "lone surrogate"),
    (b'\xff{}', "", "not UTF-8: byte 0xff at position 0"),
    (b'{"a": "\xed\xa0\x80"}', "", "not UTF-8"),  # a surrogate written as raw bytes
    (b'{"a": ', "", "not JSON"),
])
def test_the_loader_refuses_what_cannot_be_stored_and_names_where(text, path, reason):
    with pytest.raises(wire.UnstorableJSON) as refused:
        wire.load_json(text)
    assert refused.value.path == path
    assert reason in refused.value.reason


def test_the_loader_accepts_what_can_be_stored():
    document = {"emoji": "\U0001f600 é", "min": -2 ** 63, "max": 2 ** 63 - 1, "zero": -0.0, "big": 1.7e308,
                "deep": json.loads("[" * 31 + "]" * 31), "none": None, "flag": True}
    assert wire.load_json(json.dumps(document).encode()) == document
    assert wire.load_json(json.dumps(document, ensure_ascii=False)) == document
    assert wire.load_json(b'"\\ud83d\\ude00"') == "\U0001f600"  # an escaped surrogate pair is one character


@pytest.mark.parametrize("kind, body, field", [
    (wire.Status, {"state": "online", "agent_version": "\ud800"}, "agent_version"),
    (wire.DeploymentReport, {"project_id": 1, "release_id": 1, "state": "failed", "step": "\ud800", "ts": 1.0},
     "step"),
    (wire.DeploymentReport, {"project_id": 1, "release_id": 1, "state": "failed", "detail": "\udc00", "ts": 1.0},
     "detail"),
    (wire.CommandResult, {"id": str(uuid.uuid4()), "state": "failed", "error": "\ud800", "ts": 1.0}, "error"),
    (wire.CommandResult, {"id": str(uuid.uuid4()), "state": "succeeded", "return": [1, "\x00"], "ts": 1.0},
     "return.1"),
    (wire.CommandMessage, {"id": str(uuid.uuid4()), "command": "test.ping", "arg": [1e400], "deadline": 4e9},
     "arg.0"),
])
def test_decode_refuses_unstorable_values_in_every_kind_of_message(kind, body, field):
    payload = json.dumps({"v": 1, **body}).encode()  # json.dumps writes them all: as escapes, or Infinity
    with pytest.raises(wire.WireError, match=f"{field}: "):
        wire.decode(kind, payload)


@pytest.mark.parametrize("ts", [math.inf, -math.inf, math.nan])
def test_a_non_finite_time_is_refused(ts):
    payload = json.dumps({"v": 1, "id": str(uuid.uuid4()), "state": "delivered", "ts": ts}).encode()
    with pytest.raises(wire.WireError, match="ts: NaN, Infinity"):
        wire.decode(wire.CommandResult, payload)


def test_encode_refuses_a_result_the_server_would_refuse():
    result = {"id": uuid.uuid4(), "state": "succeeded", "ts": time.time()}
    with pytest.raises(wire.WireError, match="return: NaN"):
        wire.encode(wire.CommandResult(**result, return_value=math.nan))
    with pytest.raises(wire.WireError, match="outgoing CommandResult is not JSON: .*surrogates not allowed"):
        wire.encode(wire.CommandResult(**{**result, "state": "failed"}, error="\ud800"))
    with pytest.raises(wire.WireError, match="outgoing CommandResult is invalid: .*ts"):
        wire.encode(wire.CommandResult(**{**result, "ts": math.inf}))


class RawRecordingClient:
    """Stands in for paho: keeps each published payload as sent."""

    def __init__(self):
        self.payloads = []

    def publish(self, topic, payload, qos=0, retain=False, correlation=None):
        self.payloads.append(payload)
        return SimpleNamespace(is_published=lambda: True)


@pytest.fixture
def nan_command(monkeypatch):
    @commands.command("test.nan", read_only=True)
    def nan(agent):
        return {"reading": math.nan}

    yield
    monkeypatch.delitem(commands.COMMANDS, "test.nan")


def test_an_agent_never_sends_a_nan_a_command_returned_but_says_why_it_could_not(tmp_path, nan_command):
    agent = SimpleNamespace(unit_id=str(uuid.uuid4()), client=RawRecordingClient(), recent_logs=logbuffer.install())
    runner = CommandRunner(agent, agent.client, tmp_path / "commands", max_parallel=1, progress_delay=0.1)
    runner.start()
    try:
        body = {"id": str(uuid.uuid4()), "command": "test.nan", "arg": [], "kwarg": {}, "timeout": None,
                "deadline": time.time() + 60}
        runner.handle_message(None, Received("", wire.encode(wire.from_builtins(wire.CommandMessage, body))))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(b'"succeeded"' in p for p in agent.client.payloads):
            time.sleep(0.01)
    finally:
        runner.stop()
    sent = [wire.load_json(payload) for payload in agent.client.payloads]  # every one readable by the server
    final = [result for result in sent if result["state"] == "succeeded"]
    assert len(final) == 1 and final[0]["return"] is None
    assert "unsendable result" in final[0]["error"] and "return.reading: NaN" in final[0]["error"]


def test_the_api_never_writes_nan_or_infinity(app):
    with pytest.raises(ValueError):
        app.json.dumps({"value": math.inf})
    assert app.json.loads(b'{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError):
        app.json.loads(b'{"a": NaN}')


# --- over HTTP ----------------------------------------------------------------

def _post_raw(live, path, body: bytes, token=True):
    headers = {"Content-Type": "application/json"}
    if not token:
        return live.request("POST", path, data=body, headers=headers, token="none")
    return live.post(path, data=body, headers=headers)


def _assert_refused(response, field, reason):
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == 400 and answer["status"] == "Bad Request"
    assert any(reason in text for text in answer["errors"][field]), answer
    assert field in answer["message"]


@pytest.fixture
def fleet(live):
    project = live.post("/docker/projects/", json={"name": "p"}).json()
    device = live.post("/dongle/devices/", json={"name": "d"}).json()
    return {"project": project, "device": device}


@pytest.mark.parametrize("path", ["/docker/projects/", "/dongle/devices/", "/dongle/register/"])
def test_nesting_a_thousand_deep_is_a_400_naming_the_depth(live, path):
    _assert_refused(_post_raw(live, path, DEEP), "json", "nested deeper than 32 levels")


@pytest.mark.parametrize("path", ["/docker/projects/", "/dongle/devices/", "/dongle/register/"])
def test_a_five_thousand_digit_integer_is_a_400_naming_the_field(live, path):
    _assert_refused(_post_raw(live, path, b'{"name": ' + HUGE_INT + b"}"), "name", "5000 digits")


@pytest.mark.parametrize("path", ["/docker/projects/", "/dongle/devices/"])
def test_a_lone_surrogate_in_a_name_is_a_400_naming_the_field(live, path):
    _assert_refused(_post_raw(live, path, b'{"name": "bad \\ud800 name"}'), "name", "lone surrogate")


def test_a_lone_surrogate_in_a_release_version_is_a_400_naming_the_field(live, fleet):
    body = release_payload([fleet["device"]["id"]], "app", "v1")
    body["version"] = "1.0\ud800"
    response = _post_raw(live, f"/docker/projects/{fleet['project']['id']}/releases/", json.dumps(body).encode())
    _assert_refused(response, "version", "lone surrogate")


def test_a_lone_surrogate_at_registration_is_a_400(live):
    response = _post_raw(live, "/dongle/register/", b'{"token": "t", "hardware_id": "hw-1", "name": "\\udbff"}',
                         token=False)
    _assert_refused(response, "name", "lone surrogate")


def test_nan_and_infinity_in_a_command_are_a_400_and_no_command_is_queued(live, fleet):
    path = f"/dongle/devices/{fleet['device']['id']}/execute/"
    response = _post_raw(live, path, b'{"command": "test.ping", "arg": [Infinity, NaN]}')
    _assert_refused(response, "arg.0", "NaN, Infinity")
    _assert_refused(_post_raw(live, path, b'{"command": "test.ping", "kwarg": {"x": 1e999}}'), "kwarg.x", "NaN")
    assert live.get(path).json()["count"] == 0


HOSTILE_BODIES = {
    "deep nesting": (DEEP, "json"),
    "huge integer": (b'{"name": ' + HUGE_INT + b"}", "name"),
    "lone surrogate": (b'{"name": "\\ud800"}', "name"),
    "NaN": (b'{"name": NaN}', "name"),
    "NUL byte": (b'{"name": "\\u0000"}', "name"),
}


def _path_values(live, fleet):
    """A value for every path parameter of the documented operations, naming things that exist."""
    release = live.post(f"/docker/projects/{fleet['project']['id']}/releases/",
                        json=release_payload([fleet["device"]["id"]], "app", "v1")).json()
    registry = live.post("/docker/registries/", json={"name": "r", "url": "127.0.0.1:5000"}).json()
    command = live.post(f"/dongle/devices/{fleet['device']['id']}/execute/", json={"command": "test.ping"}).json()
    return {"project_id": fleet["project"]["id"], "project_pk": fleet["project"]["id"], "release_id": release["id"],
            "version_hash": release["version_hash"], "device_id": fleet["device"]["id"],
            "device_pk": fleet["device"]["id"], "registry_id": registry["id"], "command_id": command["id"],
            "token_id": 1, "letter_id": 1}


def test_every_documented_json_body_refuses_every_hostile_case_with_a_400(live, fleet):
    """What schemathesis cannot write (invalid JSON text), sent to every operation the document says takes JSON."""
    values = _path_values(live, fleet)
    spec = live.get("/openapi.json").json()
    tried = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters" or "application/json" not in operation.get("requestBody", {}).get("content", {}):
                continue
            url = path.format(**values)
            for case, (body, field) in HOSTILE_BODIES.items():
                response = live.request(method.upper(), url, data=body, headers={"Content-Type": "application/json"})
                assert response.status_code == 400, (method, path, case, response.text)
                assert field in response.json()["errors"], (method, path, case, response.text)
                tried.append((method, path))
    assert len(set(tried)) >= 15  # every create, replace and update of the API
