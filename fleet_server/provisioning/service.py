"""Creating provisioning tokens and exchanging one for a device identity and broker account."""
import hashlib
import hmac
import logging
import secrets
from datetime import timedelta
from pathlib import Path

from flask import current_app

from .. import broker_accounts
from ..errors import FleetError, Unauthorized
from ..extensions import db
from ..models import Device, utcnow
from .models import DeviceHardware, ProvisioningToken

log = logging.getLogger(__name__)

PREFIX = "fleet_prov_"


class BrokerUnavailable(FleetError):
    status = 503


def _digest(value: str) -> str:
    # 256 random bits per token: a plain SHA-256 cannot be reversed by guessing.
    return hashlib.sha256(value.encode()).hexdigest()


def create_token(name: str = "", expires_in: int = 3600) -> tuple[ProvisioningToken, str]:
    value = PREFIX + secrets.token_urlsafe(32)
    token = ProvisioningToken(name=name, token_hash=_digest(value), expires_at=utcnow() + timedelta(seconds=expires_in))
    db.session.add(token)
    db.session.commit()
    return token, value


def tokens_query():
    return db.select(ProvisioningToken).order_by(ProvisioningToken.id)


def _usable_token(value: str) -> ProvisioningToken:
    digest = _digest(value)
    token = db.session.scalar(db.select(ProvisioningToken).filter_by(token_hash=digest))
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise Unauthorized("the provisioning token is not valid", {"token": ["not valid"]})
    if token.used_at is not None:
        raise Unauthorized("the provisioning token was already used; ask for a new one", {"token": ["already used"]})
    if token.expires_at <= utcnow():
        raise Unauthorized("the provisioning token has expired; ask for a new one", {"token": ["expired"]})
    return token


def _claim(token: ProvisioningToken):
    """Mark the token used, in this transaction; a concurrent exchange of the same token loses."""
    claimed = db.session.execute(
        db.update(ProvisioningToken)
        .where(ProvisioningToken.id == token.id, ProvisioningToken.used_at.is_(None))
        .values(used_at=utcnow())
    ).rowcount
    if claimed != 1:
        raise Unauthorized("the provisioning token was already used; ask for a new one", {"token": ["already used"]})


def _device_for(hardware_id: str, name: str) -> tuple[Device, bool]:
    """The device this hardware registered as before, or a new one: (device, created)."""
    known = db.session.get(DeviceHardware, hardware_id)
    if known is not None:
        return db.session.get(Device, known.device_id), False
    device = Device(name=name or f"device {hardware_id[:12]}")
    db.session.add(device)
    db.session.flush()
    db.session.add(DeviceHardware(hardware_id=hardware_id, device_id=device.id))
    return device, True


def _ca_certificate() -> str | None:
    path = current_app.config.get("FLEET_DEVICE_BROKER_CA_FILE")
    return Path(path).read_text() if path else None


def register(token_value: str, hardware_id: str, name: str = "") -> tuple[dict, bool]:
    """Exchange a provisioning token: (registration document, whether a device was created).

    Everything happens in one transaction: if the broker cannot create the account, the
    token stays unused and no device is left behind.
    """
    token = _usable_token(token_value)
    try:
        _claim(token)
        device, created = _device_for(hardware_id, name)
        token.device_id = device.id
        try:
            credentials = broker_accounts.issue_device_credentials(device.unit_id)
        except broker_accounts.BrokerAccountError as exc:
            log.error("registration failed: broker account for unit_id=%s: %s", device.unit_id, exc)
            raise BrokerUnavailable("the broker could not create the device's account; try again later") from None
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    log.info("registered device=%s unit_id=%s hardware_id=%s created=%s", device.id, device.unit_id, hardware_id, created)
    username, password = credentials if credentials else (None, None)
    config = current_app.config
    return {
        "id": device.id,
        "unit_id": device.unit_id,
        "broker": {
            "url": config.get("FLEET_DEVICE_BROKER_URL") or config["FLEET_MQTT_URL"],
            "username": username,
            "password": password,
            "ca_certificate": _ca_certificate(),
        },
    }, created
