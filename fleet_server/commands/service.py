"""Command operations, callable without HTTP: create and publish commands, record results, expire.

A command is committed before it is published, so a result can never arrive for a row that
does not exist yet. Publishing happens right after the commit from the web process; what
the broker did not take stays `queued` with no `published_at`, and every worker's sweep
publishes it later, unless its TTL passed first: then it is `expired` and never sent.
"""
import json
import logging
import math
from datetime import datetime, timedelta, timezone

from flask import current_app
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_device import wire

from ..devices.service import get_device
from ..errors import NotFound, ValidationError
from ..extensions import db
from ..ingest import Rejected
from ..models import Device, utcnow
from .models import Command

log = logging.getLogger(__name__)

# A sweep leaves a command this long to the web process that just created it, so the two
# rarely send it both (the device would run it once anyway: it remembers command ids).
SWEEP_GRACE = timedelta(seconds=2)
EXPIRED_UNSENT = "the device did not receive the command before its TTL passed; it was not run"


# --- creating and reading ------------------------------------------------------

def create_command(device_pk: str, data: dict) -> Command:
    device = db.session.get(Device, device_pk)
    if device is None:
        raise ValidationError("device_pk", f"device {device_pk} does not exist")
    size = len(json.dumps([data["arg"], data["kwarg"]], separators=(",", ":")))
    if size > wire.MAX_COMMAND_ARGUMENTS_BYTES:
        raise ValidationError("arg", f"arg and kwarg take {size} bytes; at most {wire.MAX_COMMAND_ARGUMENTS_BYTES}")
    now = utcnow()
    command = Command(
        device=device,
        command=data["command"],
        arg=data["arg"],
        kwarg=data["kwarg"],
        timeout=data["timeout"],
        ttl=data["ttl"],
        state="queued",
        created_at=now,
        expires_at=now + timedelta(seconds=data["ttl"]),
    )
    db.session.add(command)
    db.session.commit()
    _publish_now(command)
    return command


def get_command(device_pk: str, command_id: str) -> Command:
    command = db.session.get(Command, command_id)
    if command is None or command.device_id != device_pk:
        raise NotFound(f"command {command_id} of device {device_pk} does not exist")
    return command


def commands_query(device_pk: str):
    """A device's commands, newest first."""
    get_device(device_pk)
    return db.select(Command).filter_by(device_id=device_pk).order_by(Command.created_at.desc(), Command.id.desc())


# --- publishing ---------------------------------------------------------------------

def message_for(command: Command, unit_id: str, now: datetime):
    """(topic, payload, MQTT v5 properties) of a command, or None when its TTL already passed."""
    remaining = (command.expires_at - now).total_seconds()
    if remaining <= 0:
        return None
    payload = wire.encode(
        wire.command_message,
        {
            "id": command.id,
            "command": command.command,
            "arg": command.arg,
            "kwarg": command.kwarg,
            "timeout": command.timeout,
            "deadline": command.expires_at.timestamp(),
        },
    )
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = wire.device_topic(unit_id, "results")
    properties.CorrelationData = command.id.encode()
    properties.MessageExpiryInterval = max(1, math.ceil(remaining))
    return wire.device_topic(unit_id, "commands"), payload, properties


def _mark_published(command_id: str, when: datetime):
    # Only this column: a result may already have been stored by a worker meanwhile.
    db.session.execute(db.update(Command).where(Command.id == command_id).values(published_at=when))
    db.session.commit()


def _publish_now(command: Command):
    """Hand a just-committed command to the broker; on failure the worker's sweep retries."""
    from ..mqtt import publisher_for

    try:
        now = utcnow()
        message = message_for(command, command.device.unit_id, now)
        if message is None:
            return
        topic, payload, properties = message
        if publisher_for(current_app).publish(topic, payload, properties=properties):
            _mark_published(command.id, now)
            log.info("command=%s device=%s published", command.id, command.device_id)
    except Exception:  # the command is stored; the request succeeded either way
        log.exception("publishing command %s failed; the worker will retry", command.id)
        db.session.rollback()


def expire_overdue(now: datetime | None = None) -> int:
    """Mark `expired` every command still queued after its TTL; returns how many."""
    now = now or utcnow()
    result = db.session.execute(
        db.update(Command)
        .where(Command.state == "queued", Command.expires_at <= now)
        .values(state="expired", error=EXPIRED_UNSENT, completed_at=now)
    )
    db.session.commit()
    if result.rowcount:
        log.info("expired %d undelivered command(s)", result.rowcount)
    return result.rowcount


def publish_pending(publish, limit: int = 500) -> int:
    """Expire what is overdue, then publish unsent commands with `publish(topic, payload, properties) -> bool`.

    Returns how many were published; stops at the first the broker does not take.
    """
    now = utcnow()
    expire_overdue(now)
    rows = db.session.execute(
        db.select(Command, Device.unit_id)
        .join(Device, Device.id == Command.device_id)
        .where(Command.state == "queued", Command.published_at.is_(None), Command.created_at <= now - SWEEP_GRACE)
        .order_by(Command.created_at)
        .limit(limit)
    ).all()
    sent = 0
    for command, unit_id in rows:
        message = message_for(command, unit_id, utcnow())
        if message is None:
            continue  # expired in the meantime; the next sweep marks it
        if not publish(*message):
            break
        _mark_published(command.id, utcnow())
        sent += 1
    db.session.rollback()
    return sent


# --- results ------------------------------------------------------------------------

def _moment(epoch: float | None) -> datetime | None:
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise Rejected(f"timestamp {epoch!r} is out of range") from None


def record_result(device: Device, report: dict) -> Command:
    """Store a device's report on one of its commands. The topic named the device, so a
    report can only ever touch that device's commands."""
    command_id = str(report["id"])
    command = db.session.get(Command, command_id)
    if command is None or command.device_id != device.id:
        raise Rejected(f"command {command_id} is not a command of device {device.id}")
    state = report["state"]
    final = state in wire.FINAL_COMMAND_STATES
    if command.state in wire.FINAL_COMMAND_STATES and command.device_reported_at is not None:
        return command  # QoS 1 duplicates and late progress never change a finished command
    if command.state in wire.FINAL_COMMAND_STATES:
        # Only a server-side `expired` gets here: the device ran it after all, and it knows best.
        log.warning("command=%s was marked %s, but the device reports %s", command.id, command.state, state)
    elif wire.command_rank(state) < wire.command_rank(command.state):
        return command  # progress that arrived after later news
    now = utcnow()
    command.state = state
    command.device_reported_at = report["ts"]
    command.delivered_at = command.delivered_at or now
    command.started_at = _moment(report["started_at"]) or command.started_at
    if final:
        command.return_value = report["return_value"]
        command.error = report["error"]
        command.truncated = report["truncated"]
        command.finished_at = _moment(report["finished_at"])
        command.completed_at = now
    return command
