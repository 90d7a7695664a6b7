"""Device operations, callable without HTTP."""
import logging

from sqlalchemy.orm import selectinload

from .. import broker_accounts, outbox
from ..errors import Conflict, NotFound
from ..extensions import db
from ..models import Device, Release, release_devices

log = logging.getLogger(__name__)


def create_device(data) -> Device:
    unit_id = data.pop("unit_id", None)
    device = Device(**data)
    if unit_id is not None:
        device.unit_id = str(unit_id)
        if db.session.scalar(db.select(Device).filter_by(unit_id=device.unit_id)) is not None:
            raise Conflict(f"a device with unit_id {device.unit_id} exists", {"unit_id": ["already registered"]})
    db.session.add(device)
    db.session.commit()
    _prepare_broker_role(device)
    return device


def _prepare_broker_role(device: Device):
    # The account itself is made when the device registers; the role can wait for that too.
    try:
        broker_accounts.prepare_device_role(device.unit_id)
    except broker_accounts.BrokerAccountError as exc:
        log.warning("broker role for unit_id=%s not made yet (made at registration): %s", device.unit_id, exc)


def get_device(device_id: str) -> Device:
    device = db.session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id} does not exist")
    return device


def device_by_unit_id(unit_id: str) -> Device | None:
    return db.session.scalar(db.select(Device).filter_by(unit_id=unit_id))


def devices_query(unit_id=None, name=None, online=None):
    # docker_releases reads each device's deployments: load them for the whole page at once.
    statement = db.select(Device).options(selectinload(Device.deployments)).order_by(Device.created_at, Device.id)
    if unit_id is not None:
        statement = statement.filter_by(unit_id=str(unit_id))
    if name is not None:
        statement = statement.filter_by(name=name)
    if online is not None:
        statement = statement.filter_by(online=online)
    return statement


def update_device(device: Device, data) -> Device:
    for field, value in data.items():
        setattr(device, field, value)
    db.session.commit()
    return device


def delete_device(device: Device):
    """Delete a device and clear its retained release topics, so nothing waits on the broker for it."""
    project_ids = db.session.scalars(
        db.select(Release.project_id)
        .join(release_devices, release_devices.c.release_id == Release.id)
        .where(release_devices.c.device_id == device.id)
        .distinct()
    )
    # Flushed after the device is gone, these rows publish empty retained payloads.
    outbox.enqueue_pairs((device.unit_id, project_id) for project_id in project_ids)
    db.session.delete(device)
    db.session.commit()
    log.info("device=%s unit_id=%s deleted", device.id, device.unit_id)
    try:
        broker_accounts.remove_device_account(device.unit_id)
    except broker_accounts.BrokerAccountError as exc:
        log.error("broker account of unit_id=%s not removed: %s; remove it by hand", device.unit_id, exc)
    outbox.flush_after_commit()
