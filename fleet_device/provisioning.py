"""Registering this device with a server, and the identity that registration leaves in the state dir.

`fleet-device register` exchanges a one-time provisioning token for the device's id, unit_id
and broker account; they are kept in `<state_dir>/identity.json` (mode 0600) and the broker's
CA in `<state_dir>/broker-ca.crt`, where `fleet-device run` finds them.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import socket
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from .state import private_directory, read_json, write_atomically

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
CA_FILE = "broker-ca.crt"
HARDWARE_ID_FILE = "hardware_id"
MACHINE_ID = Path("/etc/machine-id")
_HARDWARE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,199}$")


class RegistrationError(Exception):
    """Registration did not succeed; the message says why in words an installer can act on."""


class InsecureServer(RegistrationError):
    """The server's URL would carry the provisioning token and the broker password in clear text."""


def check_server_url(server: str, allow_plain_http: bool = False) -> None:
    """Refuse a server URL that is not https, unless it is on loopback or plain http is explicitly allowed.

    The registration answer holds the device's broker password: over plain http anyone on the
    way reads it, and the token that obtained it.
    """
    parts = urlsplit(server)
    try:
        parts.port
    except ValueError:
        raise InsecureServer(f"{server!r}: the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InsecureServer(f"{server!r}: expected https://HOST[:PORT]")
    if parts.scheme == "http" and not allow_plain_http and not is_loopback(parts.hostname):
        raise InsecureServer(f"{server} is plain http: the broker password would cross the network in clear text; "
                             "use https:// (or --insecure-http on a network you trust)")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Identity:
    device_id: str
    unit_id: str
    hardware_id: str
    server: str
    broker_url: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None


def load_identity(state_dir: Path) -> Identity | None:
    document = read_json(Path(state_dir) / IDENTITY_FILE)
    if not isinstance(document, dict):
        return None
    try:
        return Identity(**document)
    except TypeError as exc:
        log.error("ignoring %s: %s", Path(state_dir) / IDENTITY_FILE, exc)
        return None


def save_identity(state_dir: Path, identity: Identity) -> Path:
    path = Path(state_dir) / IDENTITY_FILE
    write_atomically(path, json.dumps(asdict(identity), indent=2).encode(), mode=0o600)
    return path


def hardware_id(state_dir: Path, explicit: str | None = None) -> str:
    """What tells this hardware apart: given, else /etc/machine-id, else one generated and kept in the state dir."""
    if explicit:
        value = explicit.strip()
    else:
        kept = Path(state_dir) / HARDWARE_ID_FILE
        try:
            value = MACHINE_ID.read_text().strip()
        except OSError:
            value = ""
        if not _HARDWARE_ID.match(value):
            value = kept.read_text().strip() if kept.exists() else ""
        if not _HARDWARE_ID.match(value):
            value = secrets.token_hex(16)
            write_atomically(kept, value.encode(), mode=0o600)
    if not _HARDWARE_ID.match(value):
        raise RegistrationError(f"hardware id {value!r}: expected 1-200 letters, digits, ':', '.', '_' or '-'")
    return value


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
        return body.get("message") or json.dumps(body.get("errors"))
    except ValueError:
        return response.text[:200] or response.reason


def register(server: str, token: str, state_dir: Path, *, hardware: str | None = None, name: str = "",
             timeout: float = 30.0, allow_plain_http: bool = False) -> Identity:
    """Exchange the token at `server` and store the identity; RegistrationError when refused
    (InsecureServer, before anything is sent, when the URL is plain http off loopback)."""
    check_server_url(server, allow_plain_http)
    state_dir = private_directory(state_dir)
    hardware = hardware_id(state_dir, hardware)
    url = server.rstrip("/") + "/dongle/register/"
    try:
        response = requests.post(url, json={"token": token, "hardware_id": hardware, "name": name}, timeout=timeout)
    except requests.RequestException as exc:
        raise RegistrationError(f"cannot reach the server at {server}: {exc}") from None
    if response.status_code not in (200, 201):
        raise RegistrationError(f"the server refused the registration ({response.status_code}): {_error_message(response)}")
    try:
        document = response.json()
        broker = document["broker"]
        identity = Identity(
            device_id=document["id"], unit_id=document["unit_id"], hardware_id=hardware, server=server,
            broker_url=broker["url"], username=broker.get("username"), password=broker.get("password"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistrationError(f"the server's answer is not a registration: {exc}") from None
    if broker.get("ca_certificate"):
        ca_path = state_dir / CA_FILE
        write_atomically(ca_path, broker["ca_certificate"].encode(), mode=0o600)
        identity.ca_file = str(ca_path)
    save_identity(state_dir, identity)
    return identity


def check_broker_certificate(host: str, port: int, ca_file: str | None, timeout: float = 10.0) -> None:
    """Raise ssl.SSLCertVerificationError if the broker's certificate is not trusted; an unreachable broker passes.

    The agent checks before it starts so a wrong CA is one clear error, not an endless
    reconnect loop that never says why.
    """
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError:
        raise
    except OSError as exc:
        log.warning("broker %s:%s not reachable yet (%s); the agent keeps trying", host, port, exc)
