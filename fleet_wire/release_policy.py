"""What in a release gives a container power over the device, and whether a policy allows it.

One pure function, `violations()`, shared by the server (an operator's release that needs
the admin role) and the agent (a release the device is not configured to accept, however it
arrived). It imports nothing of either side and does no I/O of its own.

What needs trust: privileged mode, host networking, another container's network namespace,
a bind of a host path outside the allowed roots (the engine's socket is never inside them:
whoever holds it is root on the device), and removing containers Fleet does not manage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

# Where releases keep their data on a device, and the directory of its update locks.
DATA_ROOT = "/var/lib/fleet-device/data"
LOCK_ROOT = "/var/lib/fleet-device/locks"
DEFAULT_BIND_ROOTS = (DATA_ROOT, LOCK_ROOT)

# The engine's API sockets (Docker's and balenaEngine's, under both spellings of the run dir).
ENGINE_SOCKETS = (
    "/run/docker.sock", "/var/run/docker.sock", "/run/balena-engine.sock", "/var/run/balena-engine.sock",
)

ROOTS_SEPARATOR = re.compile(r"[:,]")


@dataclass(frozen=True)
class ReleasePolicy:
    """What a release may hold without further trust.

    `allow_privileged` trusts everything: a privileged container can mount any host path
    itself, so limiting its binds would protect nothing.
    """

    allow_privileged: bool = False
    bind_roots: tuple[str, ...] = DEFAULT_BIND_ROOTS


@dataclass(frozen=True)
class Violation:
    field: str  # where it is in the release, e.g. containers.0.startup_parameters.privileged
    reason: str


def normalise(path) -> str | None:
    """`path` with `//`, `/./` and trailing slashes collapsed; None unless absolute and without `..` or NUL."""
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        return None
    segments = [segment for segment in path.split("/") if segment not in ("", ".")]
    if ".." in segments:
        return None
    return "/" + "/".join(segments)


def is_within(path: str, root: str) -> bool:
    """Whether normalised `path` is `root` or below it (a path boundary: `/data-evil` is not below `/data`)."""
    return root == "/" or path == root or path.startswith(root + "/")


def exposes_engine_socket(path: str) -> bool:
    """Whether binding normalised `path` hands the container an engine socket (the socket or a directory above it)."""
    return any(is_within(socket, path) for socket in ENGINE_SOCKETS)


def bind_allowed(host_path: str, roots: Iterable[str], resolve: Callable[[str], str] | None = None) -> bool:
    """Whether `host_path` lies inside one of `roots` and exposes no engine socket.

    With `resolve` (the agent passes os.path.realpath) the path is checked again with its
    symbolic links followed, against the roots followed the same way: a link a container
    left inside a root must not lead the engine out of it.
    """
    path = normalise(host_path)
    if path is None or exposes_engine_socket(path):
        return False
    clean_roots = [root for root in (normalise(r) for r in roots) if root is not None]
    if not any(is_within(path, root) for root in clean_roots):
        return False
    if resolve is None:
        return True
    real = normalise(resolve(path))
    real_roots = [root for root in (normalise(resolve(r)) for r in clean_roots) if root is not None]
    return real is not None and not exposes_engine_socket(real) and any(is_within(real, root) for root in real_roots)


def parse_bind_roots(text: str | None, setting: str = "allowed bind roots") -> tuple[str, ...]:
    """Absolute paths separated by `:` or `,`, normalised; the defaults when blank.

    Raises ValueError with one line naming the setting and the entry that is wrong.
    """
    if text is None or not text.strip():
        return DEFAULT_BIND_ROOTS
    roots = []
    for entry in (part.strip() for part in ROOTS_SEPARATOR.split(text)):
        if not entry:
            continue
        root = normalise(entry)
        if root is None:
            raise ValueError(f"{setting}: {entry!r} is not an absolute path without '..' "
                             "(expected absolute paths separated by ':' or ',')")
        if any(is_within(root, socket) for socket in ENGINE_SOCKETS):
            raise ValueError(f"{setting}: {entry!r} is an engine socket, which is never allowed as a bind")
        if root not in roots:
            roots.append(root)
    if not roots:
        raise ValueError(f"{setting}: {text!r} names no path (expected absolute paths separated by ':' or ',')")
    return tuple(roots)


def violations(release: dict, policy: ReleasePolicy, unmanaged_removals: Iterable[str] = (),
               resolve: Callable[[str], str] | None = None) -> list[Violation]:
    """Every part of `release` that `policy` does not allow, in the order of the release.

    `release` is the server's loaded body or the device's document (the same keys);
    `unmanaged_removals` are the `remove_containers` entries that name containers Fleet
    does not manage, as the caller can tell (the server by name, the agent by label).
    """
    if policy.allow_privileged:
        return []
    found = []
    for index, container in enumerate(release.get("containers") or []):
        found += _container_violations(f"containers.{index}.startup_parameters",
                                       container.get("startup_parameters") or {}, policy, resolve)
    unmanaged = set(unmanaged_removals)
    for index, name in enumerate(release.get("remove_containers") or []):
        if name in unmanaged:
            found.append(Violation(f"remove_containers.{index}",
                                   f"{name} is not a container Fleet manages"))
    return found


def _container_violations(where: str, parameters: dict, policy: ReleasePolicy, resolve) -> list[Violation]:
    found = []
    if parameters.get("privileged"):
        found.append(Violation(f"{where}.privileged", "privileged mode gives the container root on the device"))
    network = parameters.get("network_mode") or ""
    if network == "host":
        found.append(Violation(f"{where}.network_mode", "host networking shares the device's network stack"))
    elif network.startswith("container:"):
        found.append(Violation(f"{where}.network_mode",
                               f"{network} joins the network namespace of a container outside the release"))
    for index, bind in enumerate(parameters.get("binds") or []):
        host_path = bind.split(":", 1)[0] if isinstance(bind, str) else None
        if not bind_allowed(host_path, policy.bind_roots, resolve):
            found.append(Violation(f"{where}.binds.{index}", _bind_reason(host_path, policy.bind_roots)))
    return found


def _bind_reason(host_path, roots) -> str:
    path = normalise(host_path)
    if path is not None and exposes_engine_socket(path):
        return f"{host_path} exposes the engine's socket, which is root on the device"
    return f"{host_path!r} is outside the allowed bind roots ({', '.join(roots) or 'none'})"


def describe(found: Iterable[Violation]) -> str:
    """One line naming every violation: `field: reason; field: reason`."""
    return "; ".join(f"{violation.field}: {violation.reason}" for violation in found)
