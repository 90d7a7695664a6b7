"""Release operations, callable without HTTP, and the document each device receives."""
import hashlib
import json

from ..errors import NotFound, ValidationError
from ..extensions import db
from ..models import Device, Project, Registry, Release, ReleaseContainer, release_devices
from .. import outbox


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


def _resolve_devices(device_ids) -> list[Device]:
    devices = list(db.session.scalars(db.select(Device).where(Device.id.in_(device_ids)))) if device_ids else []
    missing = sorted(set(device_ids) - {d.id for d in devices})
    if missing:
        raise ValidationError("devices", f"unknown device id(s): {', '.join(missing)}")
    return devices


def _check_registries(containers):
    wanted = {c["registry_id"] for c in containers if c["registry_id"] is not None}
    if not wanted:
        return
    known = set(db.session.scalars(db.select(Registry.id).where(Registry.id.in_(wanted))))
    for index, container in enumerate(containers):
        if container["registry_id"] is not None and container["registry_id"] not in known:
            raise ValidationError(f"containers.{index}.registry", f"registry {container['registry_id']} does not exist")


def create_release(project: Project, data) -> Release:
    devices = _resolve_devices(data["device_ids"])
    _check_registries(data["containers"])
    release = Release(
        project=project,
        version=data["version"],
        version_hash=_content_hash(project.id, data),
        remove_containers=data["remove_containers"],
        devices=devices,
        containers=[
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
        ],
    )
    db.session.add(release)
    outbox.enqueue([d.unit_id for d in devices], project.id)
    db.session.commit()
    outbox.flush_after_commit()
    return release


def get_release(project_id: int, release_id: int) -> Release:
    release = db.session.get(Release, release_id)
    if release is None or release.project_id != project_id:
        raise NotFound(f"release {release_id} of project {project_id} does not exist")
    return release


def releases_query(project_id: int):
    return db.select(Release).filter_by(project_id=project_id).order_by(Release.id)


def active_release(device: Device, project_id: int) -> Release | None:
    """The newest release of the project that lists the device."""
    return db.session.scalar(
        db.select(Release)
        .join(release_devices, release_devices.c.release_id == Release.id)
        .where(Release.project_id == project_id, release_devices.c.device_id == device.id)
        .order_by(Release.id.desc())
        .limit(1)
    )


def release_document(release: Release) -> dict:
    """The release as the device receives it (wire.ReleaseSpecSchema)."""
    return {
        "id": release.id,
        "version": release.version,
        "version_hash": release.version_hash,
        "remove_containers": list(release.remove_containers),
        "containers": [
            {
                "name": c.name,
                "image": c.image,
                "tag": c.tag,
                "required_tags": list(c.required_tags),
                "startup_parameters": dict(c.startup_parameters),
                "purge_data": c.purge_data,
                "registry": c.registry_id,
                "fully_qualified_name": c.fully_qualified_name,
            }
            for c in release.containers
        ],
    }
