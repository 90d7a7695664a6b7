"""Hostile requests against the real `fleet-server serve` (gunicorn): oversized bodies get 413, slow clients hold nothing."""
import os
import socket
import subprocess
import time

import pytest
import requests

from fleet_server.config import ConfigError, from_environment
from tests.support.infra import free_port
from tests.support.stack import Process, _command, _run, eventually

CAP = 64 * 1024
CLIENT_TIMEOUT = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`fleet-server serve` with its defaults (workers, threads) on a fresh SQLite database, a 64 KiB cap."""
    tmp = tmp_path_factory.mktemp("served")
    env = {**os.environ, "FLEET_VAR_DIR": str(tmp / "var"), "FLEET_DATABASE_URL": f"sqlite:///{tmp / 'fleet.db'}",
           "FLEET_MQTT_URL": f"mqtt://127.0.0.1:{free_port()}", "FLEET_MAX_REQUEST_BYTES": str(CAP),
           "FLEET_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)}
    _run(_command("fleet-server") + ["db", "upgrade", "heads"], env)
    token = _run(_command("fleet-server") + ["tokens", "create", "--name", "tests"], env).splitlines()[-1]
    port = free_port()
    server = Process(_command("fleet-server") + ["serve", "--bind", f"127.0.0.1:{port}"], env,
                     tmp / "server.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _answers(url + "/health"), 30, message="the server's /health")
        yield {"url": url, "port": port, "headers": {"Authorization": f"APIToken {token}"}, "server": server}
    finally:
        server.stop()


def _answers(url) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _assert_too_large(response):
    assert response.status_code == 413, response.text
    body = response.json()
    assert set(body) == {"code", "status", "message", "errors"} and body["code"] == 413
    assert str(CAP) in body["message"] and "FLEET_MAX_REQUEST_BYTES" in body["message"]


def _half_sent_request(port: int, *, body_started: bool) -> socket.socket:
    """A connection that sent part of a request and then goes quiet."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = b"POST /docker/projects/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if body_started:
        connection.sendall(head + b"Content-Length: 1000\r\n\r\n{\"name\": ")
    else:
        connection.sendall(head + b"Content-Le")
    return connection


@pytest.mark.parametrize("path", ["/dongle/register/", "/docker/projects/"])
def test_a_body_announced_over_the_cap_gets_413_in_the_error_shape(served, path):
    body = b'{"name": "' + b"x" * (CAP + 1) + b'"}'
    response = requests.post(served["url"] + path, data=body, headers={**served["headers"],
                             "Content-Type": "application/json"}, timeout=10)
    _assert_too_large(response)


def test_a_chunked_body_without_content_length_over_the_cap_gets_413(served):
    def chunks():
        yield b'{"name": "'
        for _ in range(CAP // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    response = requests.post(served["url"] + "/docker/projects/", data=chunks(), timeout=10,
                             headers={**served["headers"], "Content-Type": "application/json"})
    assert "Content-Length" not in response.request.headers
    _assert_too_large(response)


def test_a_body_under_the_cap_is_served(served):
    response = requests.post(served["url"] + "/docker/projects/", json={"name": "small"}, headers=served["headers"],
                             timeout=10)
    assert response.status_code == 201, response.text


def test_idle_half_sent_requests_do_not_stop_the_api(served):
    # More than the two sync workers the server used to have, and on both sides of the headers.
    quiet = [_half_sent_request(served["port"], body_started=index % 2 == 0) for index in range(6)]
    try:
        time.sleep(0.5)  # let the server take them all
        for _ in range(5):
            response = requests.get(served["url"] + "/docker/projects/", headers=served["headers"], timeout=5)
            assert response.status_code == 200
    finally:
        for connection in quiet:
            connection.close()


def test_a_client_that_stops_mid_request_is_disconnected_after_the_client_timeout(served):
    connection = _half_sent_request(served["port"], body_started=False)
    connection.settimeout(CLIENT_TIMEOUT + 15)
    started = time.monotonic()
    try:
        try:
            answer = connection.recv(4096)
        except ConnectionResetError:
            answer = b""
    finally:
        connection.close()
    # Closed without an answer, well before the worker timeout.
    assert answer == b""
    assert time.monotonic() - started < CLIENT_TIMEOUT + 10
    # Said in one line, not as a socket error with a traceback per stalled client.
    eventually(lambda: "client stalled for" in served["server"].log(), 10, message="the stalled client's line")
    assert "TimeoutError" not in served["server"].log()


@pytest.mark.parametrize("setting, value", [
    ("FLEET_MAX_REQUEST_BYTES", "1MB"), ("FLEET_MAX_REQUEST_BYTES", "0"), ("FLEET_CLIENT_TIMEOUT", "nan"),
])
def test_a_malformed_limit_setting_stops_start_up_naming_it(tmp_path, setting, value):
    env = {**os.environ, "FLEET_VAR_DIR": str(tmp_path / "var"), setting: value}
    if setting == "FLEET_MAX_REQUEST_BYTES":
        with pytest.raises(ConfigError, match=setting):
            from_environment(env)
        return
    served = subprocess.run(_command("fleet-server") + ["serve", "--bind", f"127.0.0.1:{free_port()}"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert served.returncode != 0 and setting in served.stderr
