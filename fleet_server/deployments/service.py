"""Deployment queries, callable without HTTP: every targeted pair, with what its device last reported."""
from datetime import datetime, timezone

from ..devices.service import get_device
from ..extensions import db
from ..models import Deployment, Device, Release, release_devices
from ..pagination import paginate
from ..releases.service import get_release


def _progress(deployment: Deployment | None) -> dict:
    if deployment is None:
        return {"state": "pending", "step": None, "detail": "", "reported_at": None, "updated_at": None}
    reported = datetime.fromtimestamp(deployment.reported_at, timezone.utc) if deployment.reported_at else None
    return {"state": deployment.state, "step": deployment.step, "detail": deployment.detail,
            "reported_at": reported, "updated_at": deployment.updated_at}


def release_deployments(project_id: int, release_id: int, limit: int, offset: int) -> dict:
    """One page of the release's devices, each with its deployment progress."""
    release = get_release(project_id, release_id)
    page = paginate(
        db.select(Device).join(release_devices, release_devices.c.device_id == Device.id)
        .where(release_devices.c.release_id == release.id).order_by(Device.id),
        limit, offset,
    )
    ids = [device.id for device in page["results"]]
    reported = {d.device_id: d for d in db.session.scalars(
        db.select(Deployment).where(Deployment.release_id == release.id, Deployment.device_id.in_(ids)))}
    page["results"] = [
        {"device": device.id, "unit_id": device.unit_id, "name": device.name, **_progress(reported.get(device.id))}
        for device in page["results"]
    ]
    return page


def device_deployments(device_id: str, limit: int, offset: int) -> dict:
    """One page of the releases that target the device, newest first, each with its progress there."""
    device = get_device(device_id)
    page = paginate(
        db.select(Release).join(release_devices, release_devices.c.release_id == Release.id)
        .where(release_devices.c.device_id == device.id).order_by(Release.id.desc()),
        limit, offset,
    )
    ids = [release.id for release in page["results"]]
    reported = {d.release_id: d for d in db.session.scalars(
        db.select(Deployment).where(Deployment.device_id == device.id, Deployment.release_id.in_(ids)))}
    page["results"] = [
        {"release": release.id, "project": release.project_id, "version": release.version,
         "version_hash": release.version_hash, **_progress(reported.get(release.id))}
        for release in page["results"]
    ]
    return page
