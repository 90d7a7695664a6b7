"""One grammar on both sides: the server's API, the wire's Structs and the agent's local API accept and refuse the
same command names, binds, registry addresses, network modes and restart policies (pure logic)."""
import json
import uuid

import pytest

import fleet_wire as wire
from fleet_device.local_api import LocalApiError, _execute_request

COMMAND_NAMES = {"docker.logs": True, "test.ping": True, "a": True, "x" * 200: True, "state.sls-2_b": True,
                 "": False, "x" * 201: False, "docker logs": False, "docker.logs\n": False, "é": False, "a/b": False}


def _api_accepts(schema, body, field) -> bool:
    return field not in schema.validate(body)


@pytest.mark.parametrize("name, accepted", COMMAND_NAMES.items())
def test_a_command_name_is_accepted_or_refused_alike_by_the_api_the_wire_and_the_local_api(name, accepted):
    from fleet_server.commands.schemas import CommandCreateSchema

    assert _api_accepts(CommandCreateSchema(), {"command": name}, "command") is accepted
    payload = json.dumps({"v": 1, "id": str(uuid.uuid4()), "command": name, "deadline": 2e9}).encode()
    try:
        wire.decode(wire.CommandMessage, payload)
        wire_accepts = True
    except wire.WireError as exc:
        assert "command" in str(exc)
        wire_accepts = False
    assert wire_accepts is accepted
    try:
        _execute_request({"command": name})
        local_accepts = True
    except LocalApiError:
        local_accepts = False
    assert local_accepts is accepted


@pytest.mark.parametrize("mode, accepted", [("host", True), ("container:db", True), ("bridge", True),
                                            ("nat", False), ("host\n", False)])
def test_the_api_checks_network_modes_with_the_wire_grammar(mode, accepted):
    from fleet_server.releases.schemas import StartupParametersSchema

    assert _api_accepts(StartupParametersSchema(), {"network_mode": mode}, "network_mode") is accepted
    try:
        wire.check_network_mode(mode)
    except wire.WireError:
        assert not accepted
    else:
        assert accepted


@pytest.mark.parametrize("bind, accepted", [("/a:/b", True), ("/a:/b:ro", True), ("a:/b", False),
                                            ("/a/../etc:/b", False), ("/a:/b:rx", False)])
def test_a_bind_is_checked_alike_by_the_api_and_in_a_release_document(bind, accepted):
    from fleet_server.releases.schemas import StartupParametersSchema

    assert _api_accepts(StartupParametersSchema(), {"binds": [bind]}, "binds") is accepted
    parameters = json.dumps({"binds": [bind]}).encode()
    try:
        wire.decode(wire.StartupParameters, parameters)
    except wire.WireError as exc:
        assert not accepted and "binds" in str(exc), exc
    else:
        assert accepted


def test_the_fully_qualified_name_of_a_container_is_the_wires():
    assert wire.fully_qualified_name(7, "web") == "deployment-web-7"
    wire.check_container_name(wire.fully_qualified_name(2 ** 31, "c" * 100))
