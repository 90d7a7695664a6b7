"""The device's local API answers programs on the device, not web pages: a real agent over real HTTP.

Each agent here is a real `fleet-device run` process on the session broker; containers are
real ones on the local engine, removed afterwards.
"""
from __future__ import annotations

import json
import socket
import stat
import subprocess
import time
import uuid

import paho.mqtt.client as paho
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

import fleet_wire as wire
from tests.support.device_agent import start_agent, this_machines_lan_address
from tests.support.infra import free_port
from tests.support.stack import _command, eventually

pytestmark = pytest.mark.slow

# What an HTML form on any web site can make a browser send, without a preflight.
FORGED_FROM_A_PAGE = {"Origin": "http://evil.example", "Host": "evil.example:9000", "Content-Type": "text/plain"}


@pytest.fixture(scope="module")
def agent(broker, tmp_path_factory):
    """An agent in the default mode (local API on loopback) that may act on one named container besides its own."""
    directory = tmp_path_factory.mktemp("local-api")
    running = start_agent(broker, directory, "--commands-container", ALLOWED_NAME)
    yield running
    running.process.stop()


ALLOWED_NAME = f"fleet-test-allowed-{uuid.uuid4().hex[:8]}"


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send `head` (request line and headers, no blank line) and `body` as they are; the answer's status and JSON."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received, "the connection was closed without an answer"
    headers, _, content = received.partition(b"\r\n\r\n")
    return int(headers.split()[1]), json.loads(content)


@pytest.fixture
def unmanaged_container(docker_client, busybox_image, unique_name):
    """A running container Fleet did not deploy, with a secret in its environment."""
    container = docker_client.containers.run(
        busybox_image, ["sleep", "3600"], name=unique_name("unmanaged"), detach=True, network_mode="none",
        environment={"DATABASE_PASSWORD": "s3cret-" + uuid.uuid4().hex},
    )
    return container


@pytest.fixture
def managed_container(agent, docker_client, busybox_image, unique_name):
    """A running container labelled as the agent's deploy engine labels the ones it starts."""
    return docker_client.containers.run(
        busybox_image, ["sleep", "3600"], name=unique_name("managed"), detach=True, network_mode="none",
        labels={"fleet.project": "7", "fleet.unit_id": agent.unit_id, "fleet.release": "1"},
    )


def _status(container) -> str:
    container.reload()
    return container.status


# --- browsers are refused ---------------------------------------------------------------------

def test_a_form_posted_from_a_web_page_is_refused_and_stops_nothing(agent, unmanaged_container, managed_container):
    for container in (unmanaged_container, managed_container):
        for command in ("docker.stop", "docker.inspect"):
            response = requests.post(agent.execute_url, headers=FORGED_FROM_A_PAGE, timeout=10,
                                     data=json.dumps({"command": command, "arg": [container.name]}))
            assert response.status_code in (403, 421), response.text
            assert response.json()["message"] and "s3cret" not in response.text
    assert _status(unmanaged_container) == _status(managed_container) == "running"


def test_any_origin_is_refused_even_with_a_loopback_host(agent, managed_container):
    response = requests.post(agent.execute_url, headers={"Origin": "http://localhost:3000"}, timeout=10,
                             json={"command": "docker.stop", "arg": [managed_container.name], "kwarg": {"timeout": 0}})
    assert response.status_code == 403 and "Origin" in response.json()["message"], response.text
    assert _status(managed_container) == "running"


@pytest.mark.parametrize("host", ["evil.example:9000", "evil.example", "127.0.0.1.nip.io", "0.0.0.0:9000"])
def test_a_host_that_is_not_a_loopback_name_is_refused_as_dns_rebinding_would_send(agent, host):
    response = requests.get(agent.url + "/", headers={"Host": host}, timeout=10)
    assert response.status_code == 421 and host in response.json()["message"], response.text


@pytest.mark.parametrize("host", ["localhost", "localhost:9000", "127.0.0.1", "127.0.0.1:9000", "[::1]:9000"])
def test_loopback_names_with_or_without_a_port_are_let_in(agent, host):
    response = requests.get(agent.url + "/", headers={"Host": host}, timeout=10)
    assert response.json() == {"unit_id": agent.unit_id}


def test_a_cross_site_request_without_origin_is_refused_by_its_fetch_metadata(agent):
    response = requests.get(agent.url + "/status", headers={"Sec-Fetch-Site": "cross-site"}, timeout=10)
    assert response.status_code == 403


# --- programs on the device keep the contract -----------------------------------------------

def test_curl_dash_d_runs_a_command_as_it_always_has(agent):
    # curl -d sends application/x-www-form-urlencoded and no Origin: a program, not a page.
    completed = subprocess.run(
        ["curl", "-sS", "-d", '{"command": "test.ping"}', agent.execute_url], capture_output=True, text=True,
        timeout=30,
    )
    assert json.loads(completed.stdout)["return"] is True, completed


def test_curl_dash_d_logs_a_reading_on_the_path_without_a_unit_id_and_on_the_one_with_it(agent):
    for path in ("/logbook/", f"/dongle/{agent.unit_id}/logbook/"):
        completed = subprocess.run(
            ["curl", "-sS", "-d", '{"field": "obd.bat.voltage", "type": "float", "value": 12.6}', agent.url + path],
            capture_output=True, text=True, timeout=30,
        )
        assert json.loads(completed.stdout) == {"accepted": 1}, completed


def test_logging_a_reading_for_another_device_is_refused(agent):
    response = requests.post(f"{agent.url}/dongle/{uuid.uuid4()}/logbook/", timeout=10,
                             json={"field": "x", "type": "float", "value": 1})
    assert response.status_code == 401


def test_logging_a_reading_from_a_web_page_is_refused(agent):
    before = requests.get(agent.url + "/logbook/", timeout=10).json()["waiting"]
    response = requests.post(agent.url + "/logbook/", headers=FORGED_FROM_A_PAGE, timeout=10,
                             data=json.dumps({"field": "x", "type": "float", "value": 1}))
    assert response.status_code in (403, 421)
    assert requests.get(agent.url + "/logbook/", timeout=10).json()["waiting"] == before


# --- commands act on Fleet's containers only ----------------------------------------------------

def test_docker_stop_leaves_a_container_fleet_does_not_manage_running(agent, unmanaged_container):
    result = agent.execute("docker.stop", unmanaged_container.name, timeout=0)
    assert result["state"] == "failed" and "not managed by Fleet" in result["error"], result
    assert _status(unmanaged_container) == "running"


@pytest.mark.parametrize("command", ["docker.inspect", "docker.logs", "docker.restart", "docker.start"])
def test_other_container_commands_refuse_a_container_fleet_does_not_manage(agent, unmanaged_container, command):
    result = agent.execute(command, unmanaged_container.name)
    assert result["state"] == "failed" and "not managed by Fleet" in result["error"], result
    assert "s3cret" not in json.dumps(result)


def test_docker_ps_lists_fleets_containers_and_not_the_others(agent, unmanaged_container, managed_container):
    names = {entry["name"] for entry in agent.execute("docker.ps", all=True)["return"]}
    assert managed_container.name in names and unmanaged_container.name not in names


def test_commands_act_on_a_container_fleet_manages(agent, managed_container):
    inspected = agent.execute("docker.inspect", managed_container.name)
    assert inspected["state"] == "succeeded" and inspected["return"]["Name"] == "/" + managed_container.name
    stopped = agent.execute("docker.stop", managed_container.name, timeout=0)
    assert stopped["state"] == "succeeded" and stopped["return"]["status"] == "exited", stopped


def test_another_devices_container_is_not_this_ones(agent, docker_client, busybox_image, unique_name):
    theirs = docker_client.containers.run(
        busybox_image, ["sleep", "3600"], name=unique_name("theirs"), detach=True, network_mode="none",
        labels={"fleet.project": "7", "fleet.unit_id": str(uuid.uuid4())},
    )
    assert agent.execute("docker.stop", theirs.name, timeout=0)["state"] == "failed"
    assert _status(theirs) == "running"


def test_a_container_the_device_allows_by_name_is_in_reach(agent, docker_client, busybox_image):
    allowed = docker_client.containers.run(busybox_image, ["sleep", "3600"], name=ALLOWED_NAME, detach=True,
                                           network_mode="none")
    try:
        assert agent.execute("docker.stop", ALLOWED_NAME, timeout=0)["state"] == "succeeded"
        assert ALLOWED_NAME in {e["name"] for e in agent.execute("docker.ps", all=True)["return"]}
    finally:
        allowed.remove(force=True)


def test_a_command_from_the_server_over_mqtt_is_held_to_the_same_scope(agent, broker, unmanaged_container):
    results = []
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = lambda c, u, message: results.append(json.loads(message.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(wire.device_topic(agent.unit_id, "results"), qos=1)[0]
        eventually(lambda: requests.get(agent.url + "/status", timeout=5).json()["connected"], 20,
                   message="the agent connected to the broker")
        command_id = str(uuid.uuid4())
        payload = wire.encode(wire.from_builtins(wire.CommandMessage, {
            "id": command_id, "command": "docker.stop", "arg": [unmanaged_container.name], "kwarg": {"timeout": 0},
            "timeout": None, "deadline": time.time() + 60,
        }))
        client.publish(wire.device_topic(agent.unit_id, "commands"), payload, qos=1).wait_for_publish(10)
        final = eventually(lambda: [r for r in results if r["id"] == command_id
                                    and r["state"] in wire.FINAL_COMMAND_STATES], 20, 0.05, message="the result")
    finally:
        client.disconnect()
        client.loop_stop()
    assert final[0]["state"] == "failed" and "not managed by Fleet" in final[0]["error"]
    assert _status(unmanaged_container) == "running"


# --- bodies -------------------------------------------------------------------------------

def _post_head(agent, length_header: str) -> str:
    return (f"POST /dongle/{agent.unit_id}/execute/ HTTP/1.1\nHost: 127.0.0.1\n"
            f"Content-Type: application/json{length_header}")


@pytest.mark.parametrize("length_header, status", [
    ("\nContent-Length: -1", 400), ("\nContent-Length: abc", 400), ("\nContent-Length: 1_0", 400),
    ("\nContent-Length: 2000000", 413), ("", 411), ("\nTransfer-Encoding: chunked", 411),
    ("\nContent-Length: 5\nContent-Length: 7", 400),
])
def test_a_bad_content_length_is_a_clear_4xx(agent, length_header, status):
    code, body = raw_request(agent.url, _post_head(agent, length_header), b'{"command": "test.ping"}')
    assert code == status and body["code"] == status, body
    assert "Content-Length" in body["message"] or "chunked" in body["message"], body


def test_a_body_over_one_mebibyte_is_refused_unread(agent):
    code, body = raw_request(agent.url, _post_head(agent, f"\nContent-Length: {2 ** 20 + 1}"), b"{}")
    assert code == 413 and str(2 ** 20) in body["message"]


def test_a_body_shorter_than_announced_is_refused_once_the_client_stops_sending(agent):
    code, body = raw_request(agent.url, _post_head(agent, "\nContent-Length: 100"), b'{"command": ')
    assert code == 400 and "ended" in body["message"]


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_json_is_answered_with_400(agent, depth):
    body = b'{"command": "test.ping", "arg": ' + b"[" * depth + b"]" * depth + b"}"
    response = requests.post(agent.execute_url, data=body, timeout=10)
    assert response.status_code == 400 and "deeper" in response.json()["message"], response.text


def test_nesting_within_the_limit_and_brackets_inside_strings_are_fine(agent):
    nested = json.loads("[" * 30 + "]" * 30)
    for arg in ([nested], ["[" * 40 + '\\"[{' * 20]):
        response = requests.post(agent.execute_url, json={"command": "no.such", "arg": arg}, timeout=10)
        assert response.status_code == 200 and "unknown command" in response.json()["error"], response.text
    readings = [{"field": f"x{i}", "type": "float", "value": i} for i in range(50)]
    assert requests.post(agent.url + "/logbook/", json=readings, timeout=10).json() == {"accepted": 50}


@pytest.mark.parametrize("body, words", [
    (b'{"command": "test.ping", "timeout": NaN}', "timeout: NaN"),
    (b'{"command": "test.ping", "arg": [Infinity]}', "Infinity"),
    (b'{"command": "\\ud800"}', "surrogate"),
    (b'{"command": "test.ping", "arg": [1' + b"0" * 5000 + b"]}", "outside signed 64 bits"),
    (b'{"command": "\xff"}', "UTF-8"),
    (b"not json", "not JSON"),
])
def test_json_fleet_could_not_pass_on_is_refused_naming_why(agent, body, words):
    response = requests.post(agent.execute_url, data=body, timeout=10)
    assert response.status_code == 400 and words in response.json()["message"], response.text


def test_methods_the_api_does_not_answer_are_a_json_405(agent):
    response = requests.put(agent.execute_url, json={}, timeout=10)
    assert response.status_code == 405 and response.json()["code"] == 405


def test_a_malformed_request_line_is_a_json_400(agent):
    code, body = raw_request(agent.url, "GET / HTTP/one\nHost: 127.0.0.1")
    assert code == 400 and body["code"] == 400


def test_the_agent_keeps_answering_after_every_refusal(agent):
    assert agent.execute("test.ping")["return"] is True


# --- LAN mode -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lan_address(docker_client) -> str:
    return this_machines_lan_address(docker_client)


@pytest.fixture(scope="module")
def lan_agent(broker, tmp_path_factory, lan_address):
    directory = tmp_path_factory.mktemp("local-api-lan")
    running = start_agent(broker, directory, "--api-origin", "http://dash.lan:8080", "--api-host-name", "device.lan",
                          host=lan_address)
    yield running
    running.process.stop()


def _token(agent) -> str:
    return (agent.state_dir / "local-api.token").read_text().strip()


def test_lan_mode_keeps_the_token_in_a_file_only_the_agent_reads(lan_agent):
    path = lan_agent.state_dir / "local-api.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(_token(lan_agent)) >= 32


def test_lan_mode_refuses_another_machine_without_the_token(lan_agent):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": _token(lan_agent)}):
        response = requests.post(lan_agent.execute_url, json={"command": "test.ping"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", response.text


def test_lan_mode_answers_another_machine_with_the_token(lan_agent):
    response = requests.post(lan_agent.execute_url, json={"command": "test.ping"}, timeout=10,
                             headers={"Authorization": f"Bearer {_token(lan_agent)}"})
    assert response.json()["return"] is True


def test_lan_mode_accepts_the_configured_host_name_and_refuses_others(lan_agent):
    auth = {"Authorization": f"Bearer {_token(lan_agent)}"}
    assert requests.get(lan_agent.url + "/", headers={**auth, "Host": "device.lan:9000"}, timeout=10).ok
    refused = requests.get(lan_agent.url + "/", headers={**auth, "Host": "evil.example"}, timeout=10)
    assert refused.status_code == 421


def test_lan_mode_lets_an_allowed_origin_in_with_cors_and_refuses_others(lan_agent):
    auth = {"Authorization": f"Bearer {_token(lan_agent)}"}
    allowed = requests.post(lan_agent.execute_url, json={"command": "test.ping"}, timeout=10,
                            headers={**auth, "Origin": "http://dash.lan:8080"})
    assert allowed.json()["return"] is True
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://dash.lan:8080"
    preflight = requests.options(lan_agent.execute_url, timeout=10, headers={
        "Origin": "http://dash.lan:8080", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = requests.post(lan_agent.execute_url, json={"command": "test.ping"}, timeout=10,
                          headers={**auth, "Origin": "http://evil.example"})
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers


def test_lan_mode_keeps_the_logbook_path_without_unit_id_for_the_device_itself(lan_agent):
    auth = {"Authorization": f"Bearer {_token(lan_agent)}"}
    reading = {"field": "x", "type": "float", "value": 1}
    refused = requests.post(lan_agent.url + "/logbook/", json=reading, headers=auth, timeout=10)
    assert refused.status_code == 403 and "/dongle/<unit_id>/logbook/" in refused.json()["message"]
    accepted = requests.post(f"{lan_agent.url}/dongle/{lan_agent.unit_id}/logbook/", json=reading, headers=auth,
                             timeout=10)
    assert accepted.status_code == 202


def test_origins_without_lan_mode_stop_the_agent_with_one_clear_line(broker, tmp_path):
    completed = subprocess.run(
        _command("fleet-device") + ["run", "--unit-id", str(uuid.uuid4()), "--broker", broker.url,
                                    "--state-dir", str(tmp_path / "state"), "--api", f"127.0.0.1:{free_port()}",
                                    "--api-origin", "http://dash.lan"],
        capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 2 and "LAN mode" in completed.stderr
