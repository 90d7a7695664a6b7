"""The console scripts' entry points: each names the extra to install when its side's dependencies are missing."""
from __future__ import annotations

import re
import sys
from importlib import import_module, metadata

DISTRIBUTION = "fleet-containers"

# "Flask<4,>=3.0; extra == \"server\"" -> the name before any extras, version or marker.
_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")


def requirement_names(requires: list[str], extra: str) -> list[str]:
    """The names of the distributions that `requires` (Requires-Dist lines) lists for `extra` alone."""
    names = []
    for requirement in requires:
        _, _, marker = requirement.partition(";")
        named = _EXTRA_MARKER.search(marker)
        if named and named.group(1) == extra:
            names.append(_REQUIREMENT_NAME.match(requirement).group(1))
    return names


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_requirements(extra: str) -> list[str]:
    """What `extra` needs that is not installed; nothing when this distribution itself is not (a source checkout)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    return [name for name in requirement_names(requires, extra) if not _installed(name)]


def _first_few(names: list[str], shown: int = 3) -> str:
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")


def _run(script: str, extra: str, module: str):
    # Checked before the side's command is imported, so a missing dependency is
    # named in one line rather than by a traceback from somewhere inside it.
    missing = missing_requirements(extra)
    if not missing:
        try:
            main = import_module(module).main
        except ModuleNotFoundError as exc:
            # The side's own package is absent (an image built without it).
            if exc.name != module.partition(".")[0]:
                raise
            missing = [exc.name]
    if missing:
        print(f"{script} needs the {extra} extra: pip install '{DISTRIBUTION}[{extra}]' "
              f"(missing: {_first_few(missing)})", file=sys.stderr)
        return 1
    return main()


def server():
    """`fleet-server`: the REST API, the ingest worker and administration."""
    return _run("fleet-server", "server", "fleet_server.cli")


def device():
    """`fleet-device`: the device agent."""
    return _run("fleet-device", "device", "fleet_device.cli")
