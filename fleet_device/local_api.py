"""The agent's local HTTP API (127.0.0.1:9000 by default) for programs on the device.

Routes live in one table (`ROUTES`): a method, a path pattern and a function
`(agent, body, **path_parts) -> (status, json_body)`.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import wire
from .telemetry import reading_from_request

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
ROUTES: list[tuple[str, re.Pattern, callable]] = []


class LocalApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = f"{field}: {message}" if field else message
        self.errors = {field: [message]} if field else {}


def route(method: str, pattern: str):
    def register(function):
        ROUTES.append((method, re.compile(f"^{pattern}$"), function))
        return function

    return register


@route("GET", r"/?")
def identity(agent, body):
    return 200, {"unit_id": agent.unit_id}


@route("GET", r"/status/?")
def agent_status(agent, body):
    """Is the agent connected, and how many broker messages it rejected (malformed or not its own)."""
    return 200, {"unit_id": agent.unit_id, "connected": agent.connected.is_set(),
                 "messages": {"rejected": agent.rejected}}


# The remote endpoint's body; `ttl` is accepted for the same body to work here, and means nothing
# to a command that runs at once.
_EXECUTE_FIELDS = {"command", "arg", "kwarg", "timeout", "ttl"}


def _execute_request(body) -> tuple[str, list, dict, float | None]:
    if not isinstance(body, dict):
        raise LocalApiError(400, "the body must be a JSON object with a command")
    unknown = sorted(set(body) - _EXECUTE_FIELDS)
    if unknown:
        raise LocalApiError(400, "unknown field", unknown[0])
    command, arg, kwarg, timeout = body.get("command"), body.get("arg", []), body.get("kwarg", {}), body.get("timeout")
    if not isinstance(command, str) or not command:
        raise LocalApiError(400, "a command name such as docker.logs is required", "command")
    if not isinstance(arg, list):
        raise LocalApiError(400, "must be a list", "arg")
    if not isinstance(kwarg, dict):
        raise LocalApiError(400, "must be an object", "kwarg")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= wire.MAX_COMMAND_TIMEOUT):
        raise LocalApiError(400, f"must be a number of seconds, above 0 and at most {wire.MAX_COMMAND_TIMEOUT}",
                            "timeout")
    return command, arg, kwarg, timeout


@route("POST", r"/dongle/(?P<unit_id>[^/]+)/execute/?")
def execute_command(agent, body, unit_id):
    """Run a command now and answer with its result (the same states and fields as the remote one)."""
    if unit_id.lower() != agent.unit_id:
        raise LocalApiError(401, "this request is meant for another device")
    command, arg, kwarg, timeout = _execute_request(body)
    return 200, agent.command_runner.run_now(command, arg, kwarg, timeout)



@route("POST", r"/logbook/?")
def push_readings(agent, body):
    """Programs on the device log readings: one `{field, type, value, ts?}` or a list of them.

    202: the readings are on disk and will be sent; the whole request is refused if one is wrong.
    """
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > wire.MAX_BATCH_READINGS:
        raise LocalApiError(400, f"send one reading or a list of 1 to {wire.MAX_BATCH_READINGS}")
    readings = []
    for position, item in enumerate(items):
        try:
            readings.append(reading_from_request(item))
        except wire.WireError as exc:
            where = f"[{position}] " if isinstance(body, list) else ""
            raise LocalApiError(400, f"{where}{exc}") from None
    agent.telemetry.add(readings)
    return 202, {"accepted": len(readings)}


@route("GET", r"/logbook/?")
def telemetry_status(agent, body):
    """How many readings wait, are in flight, were dropped by the full buffer; batches sent."""
    return 200, agent.telemetry.stats()

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

    def _error(self, status: int, message: str, errors: dict | None = None):
        self._send(status, {"code": status, "status": HTTPStatus(status).phrase, "message": message,
                            "errors": errors or {}})

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise LocalApiError(400, "Content-Length is not a number") from None
        if length > MAX_BODY:
            raise LocalApiError(413, f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise LocalApiError(400, "body is not JSON") from None

    def _dispatch(self, method: str):
        path = self.path.split("?", 1)[0]
        matches = [(m, p, f) for m, p, f in ROUTES if p.match(path)]
        if not matches:
            return self._error(404, f"no such path {path}")
        for route_method, pattern, function in matches:
            if route_method == method:
                try:
                    body = self._body() if method == "POST" else None
                    status, reply = function(self.agent, body, **pattern.match(path).groupdict())
                except LocalApiError as exc:
                    return self._error(exc.status, exc.message, exc.errors)
                return self._send(status, reply)
        self._error(405, f"{method} is not allowed on {path}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")
