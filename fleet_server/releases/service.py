"""Release operations, callable without HTTP, and the document each device receives.

Every change that can alter what a device should run (create, update, delete) writes
outbox rows for all affected devices in the same transaction, then flushes: each
device gets its now-active release of the project, or a tombstone when none is left.
"""
import hashlib
import json
import logging
import re

from flask import current_app
from sqlalchemy.orm import selectinload

import fleet_wire as wire
from fleet_wire import fully_qualified_name, release_policy

from ..errors import FleetError, Forbidden, NotFound
from ..extensions import db
from ..messaging import outbox
from ..models import Device, Project, Registry, Release, ReleaseContainer, release_devices
from ..registries.service import credentials_for

log = logging.getLogger(__name__)

_VERSION_HASH = re.compile(r"^[0-9a-fA-F]{8}$")
_FULLY_QUALIFIED_NAME = re.compile(r"^deployment-(?P<name>.+)-(?P<project>[0-9]+)$")
CONTENT_FIELDS = ("version", "device_ids", "containers", "remove_containers")


class InvalidRelease(FleetError):
    """A release that is well-formed but does not fit the fleet (unknown device, clashing names, ...)."""

    status = 400


def _content_hash(project_id, data) -> str:
    content = {
        "project": project_id,
        "version": data["version"],
        "containers": data["containers"],
        "remove_containers": data["remove_containers"],
        "devices": sorted(data["device_ids"]),
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def _resolve_devices(device_ids) -> list[tuple[str, str]]:
    """The (id, unit_id) of each listed device, sorted by id; ids and unit ids only, no ORM objects
    (a fleet-wide release lists thousands of devices)."""
    found = dict(db.session.execute(db.select(Device.id, Device.unit_id).where(Device.id.in_(device_ids))).all()) \
        if device_ids else {}
    missing = sorted(set(device_ids) - set(found))
    if missing:
        raise InvalidRelease(
            f"devices: unknown device id(s): {', '.join(missing)}", {"devices": [f"unknown device id(s): {', '.join(missing)}"]}
        )
    return sorted(found.items())


def _check_registries(containers):
    wanted = {c["registry_id"] for c in containers if c["registry_id"] is not None}
    known = set(db.session.scalars(db.select(Registry.id).where(Registry.id.in_(wanted)))) if wanted else set()
    errors = {
        f"containers.{index}.registry": [f"registry {c['registry_id']} does not exist"]
        for index, c in enumerate(containers)
        if c["registry_id"] is not None and c["registry_id"] not in known
    }
    if errors:
        raise InvalidRelease("; ".join(f"{k}: {v[0]}" for k, v in errors.items()), errors)


def _check_names_on_devices(project_id: int, data, device_ids: list[str]):
    """A container's fully_qualified_name must not be another project's on any targeted device,
    and remove_containers must not name a container another project manages there."""
    if not device_ids:
        return
    mine = {fully_qualified_name(project_id, c["name"]): index for index, c in enumerate(data["containers"])}
    errors = {}
    for device_id, other_project, fqn in _containers_of_other_projects(device_ids, project_id):
        if fqn in mine:
            errors.setdefault(f"containers.{mine[fqn]}.name", []).append(
                f"{fqn} is already run on device {device_id} by project {other_project}"
            )
        if fqn in data["remove_containers"]:
            errors.setdefault("remove_containers", []).append(
                f"{fqn} on device {device_id} belongs to project {other_project}"
            )
    if errors:
        raise InvalidRelease("; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items()), errors)


def _containers_of_other_projects(device_ids: list[str], project_id: int) -> list[tuple[str, int, str]]:
    """(device id, project id, fully_qualified_name) of every container that the active release of
    another project runs on these devices: one query for the whole list, ordered by device,
    release and position."""
    active = (
        db.select(release_devices.c.device_id, db.func.max(Release.id).label("release_id"))
        .join(Release, Release.id == release_devices.c.release_id)
        .where(release_devices.c.device_id.in_(device_ids), Release.project_id != project_id)
        .group_by(release_devices.c.device_id, Release.project_id)
        .subquery()
    )
    rows = db.session.execute(
        db.select(active.c.device_id, Release.project_id, ReleaseContainer.name)
        .join(Release, Release.id == active.c.release_id)
        .join(ReleaseContainer, ReleaseContainer.release_id == Release.id)
        .order_by(active.c.device_id, Release.id, ReleaseContainer.position)
    )
    return [(device_id, other, fully_qualified_name(other, name)) for device_id, other, name in rows]


def _containers(data) -> list[ReleaseContainer]:
    return [
        ReleaseContainer(
            position=index,
            name=c["name"],
            image=c["image"],
            tag=c["tag"],
            required_tags=c["required_tags"],
            startup_parameters=c["startup_parameters"],
            purge_data=c["purge_data"],
            registry_id=c["registry_id"],
        )
        for index, c in enumerate(data["containers"])
    ]


def _check_privileges(project_id: int, data, role: str):
    """Only an admin may give a release power over its devices (release_policy); others get 403 naming each field."""
    if role == "admin":
        return
    policy = release_policy.ReleasePolicy(bind_roots=current_app.config["FLEET_ALLOWED_BIND_ROOTS"])
    found = release_policy.violations(data, policy, _unmanaged_removals(project_id, data))
    if found:
        raise Forbidden(
            f"the {role} role may not create or change this release, only admin may: {release_policy.describe(found)}",
            {violation.field: [violation.reason] for violation in found},
        )


def _unmanaged_removals(project_id: int, data) -> list[str]:
    """The remove_containers entries that are not the fully_qualified_name of a container of any release
    of any project (this one included): the server cannot see a device's engine, so it judges by name."""
    names = data["remove_containers"]
    managed = {fully_qualified_name(project_id, c["name"]) for c in data["containers"]}
    candidates = [match for match in map(_FULLY_QUALIFIED_NAME.match, names) if match and match[0] not in managed]
    if candidates:
        rows = db.session.execute(
            db.select(Release.project_id, ReleaseContainer.name).distinct()
            .join(ReleaseContainer, ReleaseContainer.release_id == Release.id)
            .where(ReleaseContainer.name.in_({match["name"] for match in candidates}))
        )
        managed |= {fully_qualified_name(project, name) for project, name in rows}
    return [name for name in names if name not in managed]


def _validated_devices(project_id: int, data) -> list[tuple[str, str]]:
    """The (id, unit_id) of the release's devices, once the release is known to fit them."""
    devices = _resolve_devices(data["device_ids"])
    _check_registries(data["containers"])
    _check_names_on_devices(project_id, data, [device_id for device_id, _unit in devices])
    return devices


def _link_devices(release: Release, devices: list[tuple[str, str]]):
    """Insert the release's device rows with one executemany (thousands of rows for a fleet-wide release)."""
    db.session.flush()  # the release's id
    if devices:
        db.session.execute(db.insert(release_devices),
                           [{"release_id": release.id, "device_id": device_id} for device_id, _unit in devices])


def create_release(project: Project, data, role: str = "admin") -> Release:
    """Create a release as a token of `role` (callers without HTTP act as the server's owner)."""
    _check_privileges(project.id, data, role)
    devices = _validated_devices(project.id, data)
    release = Release(
        project=project,
        version=data["version"],
        version_hash=_content_hash(project.id, data),
        remove_containers=data["remove_containers"],
        containers=_containers(data),
    )
    db.session.add(release)
    _link_devices(release, devices)
    outbox.enqueue([unit_id for _id, unit_id in devices], project.id)
    db.session.commit()
    log.info("release=%s project=%s created devices=%s", release.id, project.id, len(devices))
    outbox.flush_after_commit()
    return release


def _container_fields(container: ReleaseContainer) -> dict:
    """What a container is made of, as both the stored form and the device's document spell it."""
    return {
        "name": container.name,
        "image": container.image,
        "tag": container.tag,
        "required_tags": list(container.required_tags),
        "startup_parameters": dict(container.startup_parameters),
        "purge_data": container.purge_data,
    }


def _as_data(release: Release) -> dict:
    """A stored release in the form the schema loads, so a partial update can be merged and hashed."""
    return {
        "version": release.version,
        "device_ids": release.device_ids,
        "remove_containers": list(release.remove_containers),
        "containers": [{**_container_fields(c), "registry_id": c.registry_id} for c in release.containers],
    }


def update_release(release: Release, changes, role: str = "admin") -> Release:
    """Apply a full (PUT) or partial (PATCH) change; old and new devices all get their active release again.

    The release as it will be is checked against `role`: changing an admin's privileged release
    (even only its devices) republishes it, which is an admin's decision too.
    """
    before = _as_data(release)
    data = {**before, **{k: v for k, v in changes.items() if k in CONTENT_FIELDS}}
    _check_privileges(release.project_id, data, role)
    devices = _validated_devices(release.project_id, data)
    old_unit_ids = [d.unit_id for d in release.devices]
    content_changed = {k: data[k] for k in CONTENT_FIELDS if k != "device_ids"} != {
        k: before[k] for k in CONTENT_FIELDS if k != "device_ids"
    }
    kept = {device_id for device_id, _unit in devices}
    for deployment in list(release.deployments):
        # What devices reported describes the old content; a device no longer targeted has nothing to report.
        if content_changed or deployment.device_id not in kept:
            db.session.delete(deployment)
    release.version = data["version"]
    release.remove_containers = data["remove_containers"]
    # The link rows directly: the loaded `release.devices` is only read, and is reloaded after the commit.
    db.session.execute(db.delete(release_devices).where(release_devices.c.release_id == release.id))
    _link_devices(release, devices)
    if content_changed:
        release.containers = _containers(data)
    release.version_hash = _content_hash(release.project_id, data)
    outbox.enqueue(set(old_unit_ids) | {unit_id for _id, unit_id in devices}, release.project_id)
    db.session.commit()
    log.info("release=%s project=%s updated content_changed=%s", release.id, release.project_id, content_changed)
    outbox.flush_after_commit()
    db.session.refresh(release)
    return release


def delete_release(release: Release):
    """Delete a release; its devices fall back to the project's previous release for them, or a tombstone."""
    unit_ids = [d.unit_id for d in release.devices]
    project_id = release.project_id
    outbox.enqueue(unit_ids, project_id)
    db.session.delete(release)
    db.session.commit()
    log.info("release=%s project=%s deleted devices=%s", release.id, project_id, len(unit_ids))
    outbox.flush_after_commit()


def get_release(project_id: int, release_id: int) -> Release:
    release = db.session.get(Release, release_id)
    if release is None or release.project_id != project_id:
        raise NotFound(f"release {release_id} of project {project_id} does not exist")
    return release


def release_by_hash(project_id: int, version_hash: str) -> Release:
    """The newest release of the project with this version_hash (identical content hashes alike)."""
    if not _VERSION_HASH.match(version_hash):
        raise NotFound(f"{version_hash!r} is not a version_hash (8 hex digits)")
    release = db.session.scalar(
        db.select(Release).filter_by(project_id=project_id, version_hash=version_hash.lower())
        .order_by(Release.id.desc()).limit(1)
    )
    if release is None:
        raise NotFound(f"project {project_id} has no release with version_hash {version_hash}")
    return release


def releases_query(project_id: int, version=None, version_hash=None, device=None):
    # Each release shows its containers, devices and deployments: one query each for the whole page.
    statement = (
        db.select(Release)
        .options(selectinload(Release.containers), selectinload(Release.devices), selectinload(Release.deployments))
        .filter_by(project_id=project_id)
        .order_by(Release.id)
    )
    if version is not None:
        statement = statement.filter_by(version=version)
    if version_hash is not None:
        statement = statement.filter_by(version_hash=version_hash.lower())
    if device is not None:
        statement = statement.where(
            Release.id.in_(db.select(release_devices.c.release_id).where(release_devices.c.device_id == device))
        )
    return statement


def active_release(device: Device, project_id: int) -> Release | None:
    """The newest release of the project that lists the device."""
    return db.session.scalar(
        db.select(Release)
        .join(release_devices, release_devices.c.release_id == Release.id)
        .where(Release.project_id == project_id, release_devices.c.device_id == device.id)
        .order_by(Release.id.desc())
        .limit(1)
    )


def release_contents(release: Release) -> dict:
    """What a device's release topic carries of its active release: the document and the registries it pulls from.

    Decrypted credentials go only on the topic of a device the release targets, and only those it uses.
    """
    return {"release": release_document(release), "registries": credentials_for(release)}


def release_document(release: Release) -> wire.ReleaseSpec:
    """The release as the device receives it."""
    return wire.ReleaseSpec(
        id=release.id,
        version=release.version,
        version_hash=release.version_hash,
        remove_containers=list(release.remove_containers),
        containers=[
            wire.ContainerSpec(
                name=c.name, image=c.image, tag=c.tag, required_tags=list(c.required_tags),
                startup_parameters=wire.from_builtins(wire.StartupParameters, c.startup_parameters),
                purge_data=c.purge_data, registry=c.registry_id, fully_qualified_name=c.fully_qualified_name)
            for c in release.containers
        ],
    )
