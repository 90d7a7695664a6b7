"""`fleet-device register` sends the provisioning token and gets the broker password: never in clear text off loopback."""
from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.device_agent import this_machines_lan_address
from tests.support.stack import _command


class RecordingServer:
    """A stand-in for the Fleet server that records each request and refuses it with a JSON 403."""

    def __init__(self, host: str):
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.paths.append(self.path)
                body = json.dumps({"message": "refused by the test server"}).encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lan_server(docker_client):
    server = RecordingServer(this_machines_lan_address(docker_client))
    yield server
    server.close()


@pytest.fixture
def loopback_server():
    server = RecordingServer("127.0.0.1")
    yield server
    server.close()


def register(server_url: str, state_dir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command("fleet-device") + ["register", "--server", server_url, "--token", "fleet_prov_test",
                                    "--state-dir", str(state_dir), "--hardware-id", "hw-test", *extra],
        capture_output=True, text=True, timeout=60,
    )


def test_a_plain_http_server_off_loopback_is_refused_before_anything_is_sent(lan_server, tmp_path):
    host = lan_server.httpd.server_address[0]
    completed = register(f"http://{host}:{lan_server.port}", tmp_path / "state")
    assert completed.returncode == 2, completed
    assert len(completed.stderr.strip().splitlines()) == 1 and "plain http" in completed.stderr
    assert "--insecure-http" in completed.stderr
    assert lan_server.paths == [] and not (tmp_path / "state" / "identity.json").exists()


def test_insecure_http_lets_the_request_go_when_asked_for_explicitly(lan_server, tmp_path):
    host = lan_server.httpd.server_address[0]
    completed = register(f"http://{host}:{lan_server.port}", tmp_path / "state", "--insecure-http")
    assert lan_server.paths == ["/dongle/register/"]
    assert completed.returncode == 1 and "refused by the test server" in completed.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_plain_http_on_loopback_is_allowed(loopback_server, tmp_path, host):
    completed = register(f"http://{host}:{loopback_server.port}", tmp_path / "state")
    assert loopback_server.paths == ["/dongle/register/"]
    assert completed.returncode == 1 and "refused by the test server" in completed.stderr


@pytest.mark.parametrize("url", ["ftp://fleet.example", "fleet.example", "https://fleet.example:port"])
def test_a_server_url_that_is_not_http_or_https_is_a_usage_error(tmp_path, url):
    completed = register(url, tmp_path / "state")
    assert completed.returncode == 2 and url in completed.stderr, completed
