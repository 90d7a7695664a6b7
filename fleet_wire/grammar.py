"""Values both sides interpret the same way: names, paths and addresses that reach the engine, environments, commands.

Each rule is written once here. The wire's Structs use them, the agent checks with them, and
the server's REST schemas call them (through a small adapter to marshmallow's error), so a
value the API accepts is never refused on the device. A check raises WireError saying what is
wrong; a pattern is written so that it means the same to Python and to JSON Schema (the API
document publishes some of them).
"""
from __future__ import annotations

import re
import shlex
from typing import Annotated

import msgspec

from .protocol import WireError

# The agent checks these itself too: a release document must not be able to walk out of a
# path or point the engine at a surprising place, whoever wrote it.

CONTAINER_NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$"
COMMAND_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,200}$"
ENVIRONMENT_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
REGISTRY_URL_PATTERN = (
    r"^(?:https?://)?"
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?/?$"
)
_CONTAINER_NAME = re.compile(CONTAINER_NAME_PATTERN)
_COMMAND_NAME = re.compile(COMMAND_NAME_PATTERN)
_ENVIRONMENT_KEY = re.compile(ENVIRONMENT_KEY_PATTERN)
_REGISTRY_URL = re.compile(REGISTRY_URL_PATTERN)


def check_container_name(name: str) -> None:
    """Docker's container name grammar: no '/', no leading '.', nothing to climb with."""
    if not isinstance(name, str) or not _CONTAINER_NAME.fullmatch(name):
        raise WireError(f"{name!r} is not a safe container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128)")


def check_command_name(name: str) -> None:
    """A command's name, such as docker.logs: 1 to 200 letters, digits and _ . -."""
    if not isinstance(name, str) or not _COMMAND_NAME.fullmatch(name):
        raise WireError(f"{name!r} is not a command name such as docker.logs (1 to 200 of A-Z a-z 0-9 _ . -)")


def fully_qualified_name(project_id: int, container_name: str) -> str:
    """The engine's name of a project's container: stable across releases, so a new release replaces it in place."""
    return f"deployment-{container_name}-{project_id}"


def check_bind(bind: str) -> None:
    """`/host/path:/container/path[:ro|rw]`: both absolute, no '..' segment, no NUL."""
    parts = bind.split(":") if isinstance(bind, str) else []
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise WireError(f"{bind!r} is not host:container[:ro|rw]")
    for path in parts[:2]:
        if not path.startswith("/") or "\x00" in path:
            raise WireError(f"{bind!r}: {path!r} is not an absolute path")
        if ".." in path.split("/"):
            raise WireError(f"{bind!r}: {path!r} climbs out with '..'")


def check_registry_url(url: str) -> None:
    """A registry is `[http(s)://]host[:port]`: no credentials, path, query or '..' smuggled in.

    The one grammar of registry addresses: the server's API validates with it too, so a release
    it accepts is never refused on the device.
    """
    if not isinstance(url, str) or not _REGISTRY_URL.fullmatch(url):
        # The address itself is not repeated: it may hold a password.
        raise WireError(f"not a registry address ([https://]host[:port]){_registry_url_flaw(url)}")


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


def check_environment_key(key: str) -> None:
    if not isinstance(key, str) or not _ENVIRONMENT_KEY.fullmatch(key):
        raise WireError(f"{key!r} is not a valid variable name")


def parse_environment(text: str) -> dict[str, str]:
    """Parse AutoPi's environment string (`KEY='value' OTHER=x`) shell-style.

    Raises WireError naming the first word that is not KEY=VALUE.
    """
    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise WireError(f"environment cannot be parsed: {exc}") from None
    environment = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not _ENVIRONMENT_KEY.fullmatch(key):
            raise WireError(f"environment entry {word!r} is not KEY=VALUE")
        environment[key] = value
    return environment


RESTART_POLICY_PATTERN = r"^(no|always|unless-stopped|on-failure(:[0-9]{1,4})?)$"
NETWORK_MODE_PATTERN = r"^(bridge|host|none|container:[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127})$"
_RESTART_POLICY = re.compile(RESTART_POLICY_PATTERN)
_NETWORK_MODE = re.compile(NETWORK_MODE_PATTERN)


def check_restart_policy(policy: str) -> None:
    if not isinstance(policy, str) or not _RESTART_POLICY.fullmatch(policy):
        raise WireError("expected no, always, unless-stopped or on-failure[:N]")


def check_network_mode(mode: str) -> None:
    if not isinstance(mode, str) or not _NETWORK_MODE.fullmatch(mode):
        raise WireError("expected bridge, host, none or container:NAME")


def whole(pattern: str) -> str:
    """`^...$` as msgspec matches it (re.search), anchored at the very end: `$` alone also takes "name\n"."""
    return pattern.removesuffix("$") + r"\Z"


ContainerName = Annotated[str, msgspec.Meta(pattern=whole(CONTAINER_NAME_PATTERN))]
CommandName = Annotated[str, msgspec.Meta(pattern=whole(COMMAND_NAME_PATTERN))]


def check_field(name: str, check, value) -> None:
    """Run a grammar check from a Struct's __post_init__, naming the field in its error."""
    try:
        check(value)
    except WireError as exc:
        raise WireError(f"{name}: {exc}") from None


class StartupParameters(msgspec.Struct, frozen=True, kw_only=True):
    """How a container is started: the structure a release stores and the device receives.

    The server's API accepts one more spelling (an environment given as an object) and checks
    the network mode and restart policy (check_network_mode, check_restart_policy); a device
    takes them as given, so a release stored before those checks still deploys.
    """

    environment: str = ""
    binds: list[str] = []
    network_mode: str | None = None
    restart_policy: str | None = None
    privileged: bool = False

    def __post_init__(self):
        for position, bind in enumerate(self.binds):
            check_field(f"binds[{position}]", check_bind, bind)
