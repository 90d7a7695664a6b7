"""Device operations, callable without HTTP."""
import logging

from .. import broker_accounts
from ..errors import Conflict, NotFound
from ..extensions import db
from ..models import Device

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


def devices_query():
    return db.select(Device).order_by(Device.created_at, Device.id)
