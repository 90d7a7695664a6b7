"""Registry operations, callable without HTTP, and the credentials a release document carries."""
import logging

import fleet_wire as wire

from ..encryption import decrypt, encrypt
from ..errors import Conflict, NotFound
from ..extensions import db
from ..messaging import outbox
from ..models import Device, Registry, Release, ReleaseContainer, release_devices

log = logging.getLogger(__name__)


def create_registry(data) -> Registry:
    registry = Registry(
        name=data["name"], url=data["url"], username=data.get("username", ""),
        password_encrypted=encrypt(data.get("password", "")),
    )
    db.session.add(registry)
    db.session.commit()
    log.info("registry=%s created url=%s", registry.id, registry.url)
    return registry


def get_registry(registry_id: int) -> Registry:
    registry = db.session.get(Registry, registry_id)
    if registry is None:
        raise NotFound(f"registry {registry_id} does not exist")
    return registry


def registries_query():
    return db.select(Registry).order_by(Registry.id)


def update_registry(registry: Registry, data) -> Registry:
    for field in ("name", "url", "username"):
        if field in data:
            setattr(registry, field, data[field])
    if "password" in data:
        registry.password_encrypted = encrypt(data["password"])
    # Devices whose releases pull through this registry need the new url or credentials.
    outbox.enqueue_pairs(_topics_using(registry.id))
    db.session.commit()
    outbox.flush_after_commit()
    return registry


def delete_registry(registry: Registry):
    releases = list(
        db.session.scalars(
            db.select(Release)
            .where(Release.id.in_(db.select(ReleaseContainer.release_id).filter_by(registry_id=registry.id)))
            .order_by(Release.id)
        )
    )
    if releases:
        names = ", ".join(f"{r.id} (project {r.project_id}, version {r.version})" for r in releases)
        raise Conflict(
            f"registry {registry.id} is used by release(s) {names}; change or delete them first",
            {"releases": [str(r.id) for r in releases]},
        )
    db.session.delete(registry)
    db.session.commit()


def _topics_using(registry_id: int) -> list[tuple[str, int]]:
    """(unit_id, project_id) of every device targeted by a release that references the registry."""
    rows = db.session.execute(
        db.select(Device.unit_id, Release.project_id)
        .join(release_devices, release_devices.c.device_id == Device.id)
        .join(Release, Release.id == release_devices.c.release_id)
        .where(Release.id.in_(db.select(ReleaseContainer.release_id).filter_by(registry_id=registry_id)))
        .distinct()
    )
    return [tuple(row) for row in rows]


def credentials_for(release: Release) -> list[wire.RegistryCredentials]:
    """The registries a release pulls from, decrypted, for that release's devices only."""
    wanted = sorted({c.registry_id for c in release.containers if c.registry_id is not None})
    if not wanted:
        return []
    registries = db.session.scalars(db.select(Registry).where(Registry.id.in_(wanted)).order_by(Registry.id))
    return [
        wire.RegistryCredentials(id=r.id, url=r.url, username=r.username, password=decrypt(r.password_encrypted))
        for r in registries
    ]
