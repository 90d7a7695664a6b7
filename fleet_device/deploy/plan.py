"""The pure deploy plan: what runs on the device + the release a project wants → the steps between them.

Nothing here touches the engine or the disk (the policy check follows symbolic links, given
the function to do it); the device state is read beforehand (see `docker_engine.py`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from fleet_wire import release_policy
from fleet_wire.release_policy import ReleasePolicy
from .errors import DeployError
from .steps import DropBackup, Login, Prune, Pull, Purge, Remove, Start, Step, Stop, Verify

OLD_SUFFIX = ".fleet-old"


@dataclass(frozen=True)
class Running:
    """A container as the plan sees it."""

    name: str
    project: str | None = None
    release: str | None = None
    version_hash: str | None = None
    running: bool = True
    image: str | None = None  # the reference it was created from


@dataclass(frozen=True)
class DeviceState:
    """Everything `plan()` needs to know about the device, read beforehand."""

    containers: tuple[Running, ...] = ()
    images: frozenset[str] = frozenset()  # image references (repo:tag) present on the engine
    previous: dict | None = None  # the project's release applied last
    needed_elsewhere: frozenset[str] = frozenset()  # references other projects' releases need


def registry_host(url: str) -> str:
    """`https://host:5000/` → `host:5000`; a bare `host:5000` stays as it is."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    return parts.netloc or url


def image_reference(container: dict, registries: dict[int, dict]) -> str:
    """The repository to pull: the image, prefixed with its registry's host when it has none."""
    image = container["image"]
    registry = registries.get(container.get("registry"))
    if registry is None:
        return image
    host = registry_host(registry["url"])
    return image if image.startswith(host + "/") else f"{host}/{image}"


def release_image_refs(release: dict | None, registries: dict[int, dict]) -> list[str]:
    """Every image reference a release needs, required tags before each container's tag."""
    refs: list[str] = []
    for container in (release or {}).get("containers", []):
        repository = image_reference(container, registries)
        for tag in [*container.get("required_tags", []), container["tag"]]:
            if f"{repository}:{tag}" not in refs:
                refs.append(f"{repository}:{tag}")
    return refs


def purge_paths(release: dict) -> list[str]:
    """Host directories bound writable by the release's purge_data containers."""
    paths: list[str] = []
    for container in release["containers"]:
        if not container.get("purge_data"):
            continue
        for bind in (container.get("startup_parameters") or {}).get("binds") or []:
            parts = bind.split(":")
            # A read-only bind is configuration the container is given, not data it wrote.
            if len(parts) >= 2 and parts[-1] != "ro" and parts[0] not in paths:
                paths.append(parts[0])
    return paths


def _already_runs(project: str, release: dict, owned: list[Running]) -> bool:
    wanted = sorted(c["fully_qualified_name"] for c in release["containers"])
    return sorted(c.name for c in owned) == wanted and all(
        c.running and c.release == str(release["id"]) and c.version_hash == release["version_hash"] for c in owned
    )


def initial_containers(release: dict, state: DeviceState) -> list[Running]:
    """The containers `remove_containers` names that exist and carry no project's label: Fleet does not manage them."""
    by_name = {c.name: c for c in state.containers}
    return [by_name[n] for n in dict.fromkeys(release.get("remove_containers") or [])
            if n in by_name and by_name[n].project is None]


def check_policy(release: dict, state: DeviceState, policy: ReleasePolicy):
    """Refuse a release this device is not configured to trust, whoever sent it, before anything is done.

    Bind paths are checked with their symbolic links followed too: a link that a container left
    in an allowed directory must not lead a later bind out of it.
    """
    unmanaged = [c.name for c in initial_containers(release, state)]
    found = release_policy.violations(release, policy, unmanaged, resolve=os.path.realpath)
    if found:
        raise DeployError("policy", f"this device does not allow {release_policy.describe(found)} "
                                    "(see --allow-privileged and --allowed-bind-roots)")


def plan(project_id: int, release: dict | None, state: DeviceState, registries: dict[int, dict]) -> list[Step]:
    """The steps that move the project from `state` to `release` (None: remove the project).

    An empty list means the release already runs. Raises DeployError("plan", ...) when the
    release cannot be applied at all (a name held by a container it may not touch, an unknown
    registry); nothing has changed then.
    """
    project = str(project_id)
    owned = sorted((c for c in state.containers if c.project == project), key=lambda c: (-len(c.name), c.name))
    old_refs = release_image_refs(state.previous, registries) + [c.image for c in owned if c.image]
    if release is None:
        return [Remove(c.name) for c in owned] + _prunes(old_refs, set(), state)

    initial = initial_containers(release, state)
    if _already_runs(project, release, owned) and not initial:
        return []
    wanted = [c["fully_qualified_name"] for c in release["containers"]]
    _check_names(project, wanted, state, initial)
    _check_registries(release, registries)

    refs = release_image_refs(release, registries)
    hosts = [registry_host(registries[c["registry"]]["url"]) for c in release["containers"]
             if c.get("registry") is not None and registries[c["registry"]].get("username")]
    steps: list[Step] = [Login(host) for host in dict.fromkeys(hosts)]
    steps += [Pull(ref) for ref in refs if ref not in state.images]
    stopped = [Stop(c.name, rename_to=c.name + OLD_SUFFIX if c.name in wanted else None, initial=True)
               for c in initial]
    stopped += [Stop(c.name, rename_to=c.name + OLD_SUFFIX) for c in owned]
    steps += stopped
    purged = purge_paths(release)
    steps += [Purge(path) for path in purged]
    steps += [Start(c["fully_qualified_name"], f"{image_reference(c, registries)}:{c['tag']}", c)
              for c in release["containers"]]
    steps.append(Verify(tuple(wanted)))
    steps += [Remove(s.rename_to or s.name) for s in stopped]
    steps += [DropBackup(path) for path in purged]
    return steps + _prunes(old_refs, set(refs), state)


def _check_names(project: str, wanted: list[str], state: DeviceState, initial: list[Running]):
    by_name = {c.name: c for c in state.containers}
    for name in wanted:
        holder = by_name.get(name)
        if holder is not None and holder.project != project and holder not in initial:
            raise DeployError("plan", f"a container named {name} exists and is not managed by project {project}; "
                                      "name it in remove_containers to replace it")


def _check_registries(release: dict, registries: dict[int, dict]):
    for container in release["containers"]:
        if container.get("registry") is not None and container["registry"] not in registries:
            raise DeployError("plan", f"container {container['name']} names registry {container['registry']}, "
                                      "which this device has no credentials for")


def _prunes(old_refs: list[str], keep: set[str], state: DeviceState) -> list[Step]:
    """Images the project used before that nothing on the device needs any more."""
    keep = keep | state.needed_elsewhere
    return [Prune(ref) for ref in dict.fromkeys(old_refs) if ref not in keep and ref in state.images]
