"""Recording what devices report. The topic names the device; the payload is never trusted for that."""
import logging
from datetime import datetime, timezone

from fleet_device import wire

from .extensions import db
from .logbook.service import record_telemetry
from .models import Deployment, Device, Release, release_devices

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A well-formed message that does not fit the device or release it names."""


def record_deployment(device: Device, report: dict) -> Deployment:
    release = db.session.get(Release, report["release_id"])
    if release is None or release.project_id != report["project_id"]:
        raise Rejected(f"release {report['release_id']} of project {report['project_id']} does not exist")
    targeted = db.session.scalar(
        db.select(release_devices.c.release_id).where(
            release_devices.c.release_id == release.id, release_devices.c.device_id == device.id
        )
    )
    if targeted is None:
        raise Rejected(f"release {release.id} does not target device {device.id}")
    deployment = db.session.scalar(db.select(Deployment).filter_by(release_id=release.id, device_id=device.id))
    if deployment is None:
        deployment = Deployment(release_id=release.id, device_id=device.id, state=report["state"])
        db.session.add(deployment)
    elif report["ts"] < deployment.reported_at:
        return deployment  # QoS 1 may deliver late duplicates: older news never overwrites newer
    deployment.state = report["state"]
    deployment.step = report["step"]
    deployment.detail = report["detail"]
    deployment.reported_at = report["ts"]
    if report["state"] == "succeeded":
        _supersede_others(device, release)
    return deployment


def _supersede_others(device: Device, release: Release):
    """A device runs one release per project: the others it ran are no longer deployed."""
    others = db.session.scalars(
        db.select(Deployment)
        .join(Release, Release.id == Deployment.release_id)
        .where(
            Deployment.device_id == device.id,
            Release.project_id == release.project_id,
            Deployment.release_id != release.id,
            Deployment.state == "succeeded",
        )
    )
    for other in others:
        other.state = "superseded"
        other.detail = f"replaced by release {release.id}"


def record_status(device: Device, status: dict):
    device.online = status["state"] == "online"
    device.last_seen_at = datetime.now(timezone.utc)
    if status.get("agent_version"):
        device.agent_version = status["agent_version"]


def record_command_result(device: Device, result: dict):
    from .commands.service import record_result  # imported late: the commands package imports this module

    return record_result(device, result)


_HANDLERS = {
    "deployments": (wire.deployment_report, record_deployment),
    "status": (wire.status_message, record_status),
    "telemetry": (wire.telemetry_batch, record_telemetry),
    "results": (wire.command_result, record_command_result),
}
KINDS = tuple(_HANDLERS)


def handle_message(topic: str, payload: bytes) -> bool:
    """Validate and store one device message in its own transaction.

    Returns False when the message was rejected (logged, nothing written).
    """
    try:
        where = wire.parse_topic(topic)
        schema, record = _HANDLERS[where.kind]
        if where.kind == "status" and payload == b"":
            return True  # a cleared retained status
        message = wire.decode(schema, payload)
        device = db.session.scalar(db.select(Device).filter_by(unit_id=where.unit_id))
        if device is None:
            raise Rejected(f"no device has unit_id {where.unit_id}")
        record(device, message)
        db.session.commit()
        return True
    except (wire.WireError, Rejected, KeyError) as exc:
        db.session.rollback()
        log.warning("rejected device message topic=%s reason=%s", topic, exc)
        return False
