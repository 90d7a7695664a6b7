"""The agent's local HTTP API (127.0.0.1:9000 by default) for programs on the device."""
from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .commands import CommandError, execute

log = logging.getLogger(__name__)

_EXECUTE = re.compile(r"^/dongle/(?P<unit_id>[^/]+)/execute/?$")
MAX_BODY = 1024 * 1024


class LocalApi:
    def __init__(self, agent, host: str, port: int):
        self.agent = agent
        handler = type("Handler", (_Handler,), {"agent": agent})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address

    def start(self):
        threading.Thread(target=self.server.serve_forever, name="local-api", daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    agent = None
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        log.debug("local api: " + fmt, *args)

    def _send(self, status: int, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"code": status, "status": HTTPStatus(status).phrase, "message": message})

    def do_GET(self):
        if self.path.split("?")[0] in ("", "/"):
            return self._send(200, {"unit_id": self.agent.unit_id})
        self._error(404, f"no such path {self.path}")

    def do_POST(self):
        match = _EXECUTE.match(self.path.split("?")[0])
        if not match:
            return self._error(404, f"no such path {self.path}")
        if match["unit_id"].lower() != self.agent.unit_id:
            return self._error(401, "this request is meant for another device")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "Content-Length is not a number")
        if length > MAX_BODY:
            return self._error(413, f"body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._error(400, "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("command"), str):
            return self._error(400, "command: a command name is required")
        try:
            value = execute(self.agent, body["command"], body.get("arg", []), body.get("kwarg", {}))
        except CommandError as exc:
            return self._send(200, {"state": "failed", "error": str(exc)})
        except Exception as exc:
            log.exception("command %s failed", body["command"])
            return self._send(200, {"state": "failed", "error": f"{type(exc).__name__}: {exc}"})
        self._send(200, {"state": "succeeded", "return": value})
