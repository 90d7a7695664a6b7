"""Values both sides interpret the same way: names and paths that reach the engine, registry addresses, environments."""
from __future__ import annotations

import re

from marshmallow import ValidationError

from .protocol import WireError

# The agent checks these itself too: a release document must not be able to walk out of a
# path or point the engine at a surprising place, whoever wrote it.

_SAFE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
# Written so that it means the same to Python and to JSON Schema (the API document publishes it).
REGISTRY_URL_PATTERN = (
    r"^(?:https?://)?"
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?/?$"
)
_REGISTRY_URL = re.compile(REGISTRY_URL_PATTERN)


def check_container_name(name: str) -> None:
    """Docker's container name grammar: no '/', no leading '.', nothing to climb with."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ValidationError(f"{name!r} is not a safe container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128)")


def check_bind(bind: str) -> None:
    """`/host/path:/container/path[:ro|rw]`: both absolute, no '..' segment, no NUL."""
    parts = bind.split(":") if isinstance(bind, str) else []
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ValidationError(f"{bind!r} is not host:container[:ro|rw]")
    for path in parts[:2]:
        if not path.startswith("/") or "\x00" in path:
            raise ValidationError(f"{bind!r}: {path!r} is not an absolute path")
        if ".." in path.split("/"):
            raise ValidationError(f"{bind!r}: {path!r} climbs out with '..'")


def check_registry_url(url: str) -> None:
    """A registry is `[http(s)://]host[:port]`: no credentials, path, query or '..' smuggled in.

    The one grammar of registry addresses: the server's API validates with it too, so a release
    it accepts is never refused on the device.
    """
    if not isinstance(url, str) or not _REGISTRY_URL.fullmatch(url):
        # The address itself is not repeated: it may hold a password.
        raise ValidationError(f"not a registry address ([https://]host[:port]){_registry_url_flaw(url)}")


def _registry_url_flaw(url) -> str:
    """Why a refused registry address is refused, when a common mistake explains it (else nothing)."""
    if not isinstance(url, str):
        return ""
    scheme, has_scheme, rest = url.partition("://")
    if has_scheme and scheme not in ("http", "https"):
        return f": the scheme {scheme!r} is neither http nor https"
    rest = rest if has_scheme else url
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        return ": credentials belong in the registry's username and password, not in its address"
    if "#" in rest:
        return ": an address has no fragment (#...)"
    if "?" in rest:
        return ": an address has no query (?...)"
    if rest.rstrip("/") != authority:
        return ": an address has no path (Docker names images under host[:port] alone)"
    return ""



_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_environment(text: str) -> dict[str, str]:
    """Parse AutoPi's environment string (`KEY='value' OTHER=x`) shell-style.

    Raises WireError naming the first word that is not KEY=VALUE.
    """
    import shlex

    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise WireError(f"environment cannot be parsed: {exc}") from None
    environment = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise WireError(f"environment entry {word!r} is not KEY=VALUE")
        environment[key] = value
    return environment
