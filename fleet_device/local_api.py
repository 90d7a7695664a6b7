"""The agent's local HTTP API (127.0.0.1:9000 by default) for programs on the device, never for a browser.

Routes live in one table (`ROUTES`): a method, a path pattern and a function
`(agent, body, **path_parts) -> (status, json_body)`.

Before a route runs, every request passes the gate (`Gate.check`), whose reasons are
in docs/security.md ("The device's local API"): a request carrying `Origin` (every
cross-site POST a browser sends) is refused unless LAN mode allows that origin; `Host`
must name this API (a loopback name, the address the request arrived on, or a configured
name), which defeats DNS rebinding; in LAN mode a peer that is not the device itself
must present the device's token. Bodies are bounded (`Content-Length` required, at most
1 MiB) and their JSON is strict (nesting, NaN, lone surrogates). Every refusal is a 4xx
with the same JSON error shape as the server's.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fleet_wire as wire
from .provisioning import is_loopback
from .state import private_directory, write_atomically
from .telemetry import reading_from_request

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
# Seconds a client may take to send its request: a half-sent request must not hold a thread forever.
SOCKET_TIMEOUT = 30
TOKEN_FILE = "local-api.token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ROUTES: list[tuple[str, re.Pattern, callable]] = []


class LocalApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = f"{field}: {message}" if field else message
        self.errors = {field: [message]} if field else {}
        self.headers = headers or {}


def route(method: str, pattern: str):
    def register(function):
        ROUTES.append((method, re.compile(f"^{pattern}$"), function))
        return function

    return register


# --- who may ask ---------------------------------------------------------------------

def load_or_create_token(state_dir: Path) -> tuple[str, Path]:
    """The device's local API token and its file (`<state_dir>/local-api.token`, 0600), made at first use."""
    path = Path(state_dir) / TOKEN_FILE
    private_directory(path.parent)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = secrets.token_urlsafe(32)
        write_atomically(path, (token + "\n").encode(), mode=0o600)
    return token, path


@dataclass(frozen=True)
class Gate:
    """Who the local API answers. Loopback mode (the default): programs on the device only.

    LAN mode (the API bound to an address other than loopback): other machines may ask too,
    with `Authorization: Bearer <token>`; `origins` are the web origins allowed to call it
    from a browser, `host_names` the names it is reached by besides its addresses.
    """

    lan: bool = False
    token: str | None = None
    origins: frozenset = frozenset()
    host_names: frozenset = frozenset()

    def check(self, headers, peer: str, local_address: str):
        """Raise LocalApiError when the request must not be answered."""
        self._check_host(headers.get_all("Host") or [], local_address)
        self._check_origin(headers)
        if self.lan and not is_loopback(peer):
            self._check_token(headers.get("Authorization"))

    def _check_host(self, hosts: list, local_address: str):
        if not hosts:
            return  # no browser omits Host; an HTTP/1.0 program on the device may
        if len(hosts) > 1:
            raise LocalApiError(400, "more than one Host header")
        name = _host_name(hosts[0])
        allowed = name in LOOPBACK_NAMES or name == local_address.lower() or name in self.host_names
        if not allowed:
            names = ", ".join(sorted(LOOPBACK_NAMES | self.host_names))
            raise LocalApiError(421, f"Host {hosts[0]!r} does not name this device's local API; "
                                     f"use one of {names} (a page reached by another name is not let in)")

    def _check_origin(self, headers):
        origin = headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in self.origins:
            hint = "" if self.lan else "; LAN mode can allow origins"
            raise LocalApiError(403, f"requests from web pages (Origin {origin!r}) are refused: the local API is "
                                     f"for programs on the device{hint}")
        if origin is None and headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            raise LocalApiError(403, "requests from web pages (Sec-Fetch-Site) are refused")

    def _check_token(self, authorization: str | None):
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise LocalApiError(401, "a request from another machine needs Authorization: Bearer <the device's "
                                     f"token in {TOKEN_FILE}>", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(presented.strip().encode(), (self.token or "").encode()):
            raise LocalApiError(401, "the token is not this device's", headers={"WWW-Authenticate": "Bearer"})

    def cors_headers(self, headers) -> dict:
        origin = (headers.get("Origin") or "").rstrip("/")
        if origin and origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}


def _host_name(host: str) -> str:
    """The name in a Host header without its port: `[::1]:9000` → `::1`, `localhost:9000` → `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def build_gate(bind_host: str, state_dir: Path, origins=(), host_names=()) -> Gate:
    """The gate for an API bound to `bind_host`: LAN mode, with the device's token, unless it is loopback."""
    origins = frozenset(o.rstrip("/") for o in origins)
    host_names = frozenset(n.lower() for n in host_names)
    if is_loopback(bind_host):
        return Gate(origins=frozenset(), host_names=frozenset())
    token, path = load_or_create_token(state_dir)
    log.warning("local API in LAN mode on %s: other machines need the token in %s; allowed origins: %s",
                bind_host, path, ", ".join(sorted(origins)) or "none")
    return Gate(lan=True, token=token, origins=origins, host_names=host_names)


# --- bodies --------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(r"^[0-9]{1,16}$")


def body_length(headers) -> int:
    """The declared body length, checked: LocalApiError 411, 400 or 413 naming what is wrong."""
    if headers.get("Transfer-Encoding"):
        raise LocalApiError(411, "chunked bodies are not accepted; send Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise LocalApiError(411, "a POST needs a Content-Length header")
    if len(set(v.strip() for v in values)) > 1:
        raise LocalApiError(400, "Content-Length is given more than once with different values")
    text = values[0].strip()
    if not _CONTENT_LENGTH.match(text):
        raise LocalApiError(400, f"Content-Length {text!r} is not a whole number of bytes")
    length = int(text)
    if length > MAX_BODY:
        raise LocalApiError(413, f"Content-Length {length}: bodies of at most {MAX_BODY} bytes are accepted")
    return length


def load_body(raw: bytes):
    """The JSON in a request body, by the wire contract's rules (`wire.load_json`): LocalApiError 400 naming why."""
    try:
        return wire.load_json(raw)
    except wire.UnstorableJSON as exc:
        raise LocalApiError(400, f"the body is refused: {exc}") from None


# --- routes --------------------------------------------------------------------------

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
    try:
        wire.check_command_name(command)
    except wire.WireError as exc:
        raise LocalApiError(400, str(exc), "command") from None
    if not isinstance(arg, list):
        raise LocalApiError(400, "must be a list", "arg")
    if not isinstance(kwarg, dict):
        raise LocalApiError(400, "must be an object", "kwarg")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= wire.MAX_COMMAND_TIMEOUT):
        raise LocalApiError(400, f"must be a number of seconds, above 0 and at most {wire.MAX_COMMAND_TIMEOUT}",
                            "timeout")
    return command, arg, kwarg, timeout


def _check_unit_id(agent, unit_id: str):
    if unit_id.lower() != agent.unit_id:
        raise LocalApiError(401, "this request is meant for another device")


@route("POST", r"/dongle/(?P<unit_id>[^/]+)/execute/?")
def execute_command(agent, body, unit_id):
    """Run a command now and answer with its result (the same states and fields as the remote one)."""
    _check_unit_id(agent, unit_id)
    command, arg, kwarg, timeout = _execute_request(body)
    return 200, agent.command_runner.run_now(command, arg, kwarg, timeout)


@route("POST", r"/dongle/(?P<unit_id>[^/]+)/logbook/?")
def push_readings_for_unit(agent, body, unit_id):
    """`POST /logbook/` with the unit id in the path, as execute has it; the form for other machines."""
    _check_unit_id(agent, unit_id)
    return push_readings(agent, body)


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


# Paths without the unit id, answered only to programs on the device itself (the peer is
# loopback): kept so that `curl -d ... 127.0.0.1:9000/logbook/` works as it always has.
LOOPBACK_ONLY = {("POST", "/logbook/"), ("POST", "/logbook")}


class LocalApi:
    def __init__(self, agent, host: str, port: int, gate: Gate | None = None):
        self.agent = agent
        handler = type("Handler", (_Handler,), {"agent": agent, "gate": gate or Gate()})
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
    gate: Gate = Gate()
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def log_message(self, fmt, *args):
        log.debug("local api: " + fmt, *args)

    def _send(self, status: int, body, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, errors: dict | None = None, headers: dict | None = None):
        self._send(status, {"code": status, "status": HTTPStatus(status).phrase, "message": message,
                            "errors": errors or {}}, headers)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (bad request line, headers too long) in the same JSON shape."""
        self.close_connection = True
        # A request line it could not parse leaves HTTP/0.9, which would answer without a status line.
        self.request_version = "HTTP/1.1"
        # 501 is what the standard library says to a method it has no handler for: a refusal, so a 405.
        status = 405 if code == 501 else code if 400 <= code < 500 else 400
        self._error(status, message or HTTPStatus(status).phrase)
        self._discard_unread()

    def _body(self):
        length = body_length(self.headers)
        raw = self.rfile.read(length) if length else b""
        self._unread_body = False
        if len(raw) < length:
            raise LocalApiError(400, f"the body ended after {len(raw)} of {length} bytes")
        return load_body(raw) if raw else None

    def _dispatch(self, method: str):
        path = self.path.split("?", 1)[0]
        self._unread_body = method == "POST"
        try:
            self.gate.check(self.headers, self.client_address[0], self.connection.getsockname()[0])
            found = [(m, p, f) for m, p, f in ROUTES if p.match(path)]
            if not found:
                raise LocalApiError(404, f"no such path {path}")
            matches = [(pattern, function) for m, pattern, function in found if m == method]
            if not matches:
                raise LocalApiError(405, f"{method} is not allowed on {path}")
            if (method, path) in LOOPBACK_ONLY and not is_loopback(self.client_address[0]):
                raise LocalApiError(403, f"{path} is for programs on the device; from another machine use "
                                         "/dongle/<unit_id>/logbook/")
            pattern, function = matches[0]
            body = self._body() if method == "POST" else None
            status, reply = function(self.agent, body, **pattern.match(path).groupdict())
        except LocalApiError as exc:
            return self._refuse(exc)
        except Exception:  # a bug: answer, never drop the connection without a word
            log.exception("local api: %s %s failed", method, path)
            return self._refuse(LocalApiError(500, "the agent failed to handle this request; its log says why"))
        self._send(status, reply, self.gate.cors_headers(self.headers))

    def _refuse(self, exc: LocalApiError):
        if self._unread_body:
            self.close_connection = True  # what follows on the connection is a body nobody reads
        self._error(exc.status, exc.message, exc.errors, {**exc.headers, **self.gate.cors_headers(self.headers)})
        if self._unread_body:
            self._discard_unread()

    def _discard_unread(self, limit: int = 4 * MAX_BODY, seconds: float = 2.0):
        """Read and drop what the client still sends, briefly, before closing: closing a socket with
        unread data resets it, and the client may then lose the answer it was about to read."""
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(seconds)
            deadline = time.monotonic() + seconds
            while limit > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(65536)
                if not chunk:
                    return
                limit -= len(chunk)
        except OSError:
            pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_OPTIONS(self):
        """A browser's preflight: answered only for an origin LAN mode allows."""
        try:
            self.gate.check(self.headers, self.client_address[0], self.connection.getsockname()[0])
        except LocalApiError as exc:
            if exc.status != 401:  # a preflight never carries the token; the request that follows must
                self.close_connection = True
                return self._error(exc.status, exc.message, exc.errors, exc.headers)
        headers = self.gate.cors_headers(self.headers)
        if not headers:
            return self._error(403, "preflight requests are answered only for origins LAN mode allows")
        self._send(200, {}, {**headers, "Access-Control-Allow-Methods": "GET, POST",
                             "Access-Control-Allow-Headers": "Authorization, Content-Type",
                             "Access-Control-Max-Age": "600"})

    def _not_allowed(self):
        self._unread_body = True
        self._refuse(LocalApiError(405, f"{self.command} is not allowed; the local API answers GET and POST"))

    do_PUT = do_DELETE = do_PATCH = _not_allowed
