"""Command operations, callable without HTTP: create and publish commands, record results, expire.

A command is committed before it is published, so a result can never arrive for a row that
does not exist yet. Publishing happens right after the commit from the web process; what
the broker did not take stays `queued` with no `published_at`, and every worker's sweep
publishes it later, unless its TTL passed first: then it is `expired` and never sent. The
sweep also asks again for commands that have no final result after a while (see
`Command.next_attempt_at`).
"""
import json
import logging
import math
import uuid
from datetime import datetime, timedelta, timezone

from flask import current_app

import fleet_wire as wire

from ..devices.service import get_device
from ..errors import NotFound, ValidationError
from ..extensions import db
from ..messaging.ingest import Rejected
from ..messaging.mqtt import Request, publisher_for
from ..models import Device, new_uuid, utcnow
from .models import Command

log = logging.getLogger(__name__)

# An unfinished command is asked for again after 10 s, 20 s, 40 s ... at most every 10 minutes.
FIRST_RETRY = timedelta(seconds=10)
LAST_RETRY = timedelta(minutes=10)
GIVE_UP_AFTER = timedelta(days=8) + timedelta(seconds=wire.MAX_COMMAND_TIMEOUT)
EXPIRED_UNSENT = "the device did not receive the command before its TTL passed; it was not run"


# --- creating and reading ------------------------------------------------------

# Built once: building a statement costs more than running it, and nothing else should sit
# between a command's creation and its publication.
_UNIT_ID_OF = db.select(Device.unit_id).where(Device.id == db.bindparam("device_pk"))
# The columns a new command is stored with; the others start empty.
_CREATED_COLUMNS = ("id", "device_id", "command", "arg", "kwarg", "timeout", "ttl", "state", "truncated",
                    "created_at", "expires_at", "published_at", "attempts", "next_attempt_at")
_INSERT_COMMAND = db.insert(Command.__table__).values(
    {name: db.bindparam(name, type_=Command.__table__.c[name].type) for name in _CREATED_COLUMNS})


def create_command(device_pk: str, data: dict) -> Command:
    """Store the command, publish it, and return it as it was created (not attached to the session)."""
    connection = db.session.connection()
    unit_id = connection.execute(_UNIT_ID_OF, {"device_pk": device_pk}).scalar()
    if unit_id is None:
        raise ValidationError("device_pk", f"device {device_pk} does not exist")
    size = len(json.dumps([data["arg"], data["kwarg"]], separators=(",", ":")))
    if size > wire.MAX_COMMAND_ARGUMENTS_BYTES:
        raise ValidationError("arg", f"arg and kwarg take {size} bytes; at most {wire.MAX_COMMAND_ARGUMENTS_BYTES}")
    now = utcnow()
    # Stored as published already: the broker nearly always takes it, and one write less keeps
    # the web process off the database lock while a worker stores the result. A failure undoes it.
    row = {
        "id": new_uuid(),
        "device_id": device_pk,
        "command": data["command"],
        "arg": data["arg"],
        "kwarg": data["kwarg"],
        "timeout": data["timeout"],
        "ttl": data["ttl"],
        "state": "queued",
        "truncated": False,
        "created_at": now,
        "expires_at": now + timedelta(seconds=data["ttl"]),
        "published_at": now,
        "attempts": 1,
        "next_attempt_at": now + retry_interval(1),
    }
    # One Core INSERT rather than the ORM's unit of work, and no reload after the commit:
    # nothing stands between the commit and the publication. The response shows the command
    # as it was created, whatever a worker stores meanwhile.
    connection.execute(_INSERT_COMMAND, row)
    db.session.commit()
    command = Command(**row)  # the command as stored, for the publication and the answer; never flushed
    if not _publish_now(command, unit_id):
        _mark_unpublished(command)
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

def retry_interval(attempts: int) -> timedelta:
    """How long after its `attempts`-th publication an unfinished command is asked for again."""
    return min(FIRST_RETRY * 2 ** min(max(attempts - 1, 0), 16), LAST_RETRY)


def message_for(command: Command, unit_id: str, now: datetime, first: bool | None = None):
    """(topic, payload, mqtt.Request) of the command's next publication, or None when its
    TTL passed before the device had it."""
    remaining = (command.expires_at - now).total_seconds()
    if command.attempts == 0 if first is None else first:
        expiry = remaining  # the first copy waits for a sleeping device as long as the TTL allows
    else:
        # A repeat lives only until the next one, so a sleeping device's queue holds one at most.
        expiry = retry_interval(command.attempts + 1).total_seconds()
        if command.state == "queued":
            expiry = min(expiry, remaining)
    if command.state == "queued" and remaining <= 0:
        return None
    payload = wire.encode(wire.CommandMessage(
        id=uuid.UUID(command.id), command=command.command, arg=command.arg, kwarg=command.kwarg,
        timeout=command.timeout, deadline=command.expires_at.timestamp()))
    request = Request(wire.device_topic(unit_id, "results"), command.id, max(1, math.ceil(expiry)))
    return wire.device_topic(unit_id, "commands"), payload, request


def _mark_published(command: Command, when: datetime):
    # Only these columns, and only while unfinished: a worker may have stored the result meanwhile.
    attempts = command.attempts + 1
    db.session.execute(
        db.update(Command)
        .where(Command.id == command.id, Command.state.not_in(wire.FINAL_COMMAND_STATES))
        .values(published_at=db.func.coalesce(Command.published_at, when), attempts=attempts,
                next_attempt_at=when + retry_interval(attempts))
    )
    db.session.commit()


def _publish_now(command, unit_id: str) -> bool:
    """Hand a just-committed command to the broker; False if it did not take it."""
    try:
        message = message_for(command, unit_id, utcnow(), first=True)
        if message is None:
            return False
        topic, payload, request = message
        if publisher_for(current_app).publish(topic, payload, request=request):
            log.info("command=%s device=%s published", command.id, command.device_id)
            return True
    except Exception:  # the command is stored; the request succeeded either way
        log.exception("publishing command %s failed; the worker will retry", command.id)
        db.session.rollback()
    return False


def _mark_unpublished(command: Command):
    """The broker did not take it: leave it to the worker's sweep, at once."""
    try:
        db.session.execute(
            db.update(Command).where(Command.id == command.id, Command.attempts == 1)
            .values(published_at=None, attempts=0, next_attempt_at=utcnow())
        )
        db.session.commit()
    except Exception:  # the sweep asks again after the first interval anyway
        log.exception("could not mark command %s unpublished", command.id)
        db.session.rollback()
    command.published_at, command.attempts = None, 0


def expire_overdue(now: datetime | None = None) -> int:
    """Mark `expired` every command still queued after its TTL; returns how many."""
    now = now or utcnow()
    overdue = db.select(Command.id).where(Command.state == "queued", Command.expires_at <= now).limit(1)
    if db.session.scalar(overdue) is None:
        return 0  # the common case, read-only: no write lock taken every second per worker
    result = db.session.execute(
        db.update(Command)
        .where(Command.state == "queued", Command.expires_at <= now)
        .values(state="expired", error=EXPIRED_UNSENT, completed_at=now, next_attempt_at=None)
    )
    db.session.commit()
    if result.rowcount:
        log.info("expired %d undelivered command(s)", result.rowcount)
    return result.rowcount


def publish_pending(publish, limit: int = 500) -> int:
    """Expire what is overdue, then (re)publish every unfinished command that is due, with
    `publish(topic, payload, request) -> bool`.

    Returns how many were published; stops at the first the broker does not take.
    """
    now = utcnow()
    expire_overdue(now)
    rows = db.session.execute(
        db.select(Command, Device.unit_id)
        .join(Device, Device.id == Command.device_id)
        .where(Command.state.not_in(wire.FINAL_COMMAND_STATES), Command.next_attempt_at <= now)
        .order_by(Command.next_attempt_at)
        .limit(limit)
    ).all()
    sent = 0
    for command, unit_id in rows:
        if now - command.created_at > GIVE_UP_AFTER:
            # The device never answered in a day past any timeout: stop asking, keep what is known.
            db.session.execute(db.update(Command).where(Command.id == command.id).values(next_attempt_at=None))
            db.session.commit()
            log.warning("command=%s device=%s gave up asking for its result", command.id, command.device_id)
            continue
        message = message_for(command, unit_id, utcnow())
        if message is None:
            continue  # expired in the meantime; the next sweep marks it
        if not publish(*message):
            break
        if command.attempts:
            log.info("command=%s state=%s asked for again (attempt %d)", command.id, command.state,
                     command.attempts + 1)
        _mark_published(command, utcnow())
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


def record_result(device, report: wire.CommandResult) -> None:
    """Store a device's report on one of its commands. The topic named the device, so a
    report can only ever touch that device's commands.

    The usual report moves an unfinished command of this device forward: one UPDATE whose
    condition is that rule stores it, with no read before it. Anything else (a duplicate, late
    progress, a command marked `expired`, another device's command) matches nothing; then one
    read of the few columns that decide, and an UPDATE guarded by the state that was read.
    When another worker stored a report on the same command in between, the guard matches
    nothing and the decision is taken again on what it stored.
    """
    command_id = str(report.id)
    if _advance(device, command_id, report):
        return
    for _attempt in range(5):
        if _update_from_report(device, command_id, report):
            return
    raise Rejected(f"command {command_id} kept changing while its report was stored")


# Built once: statement construction costs more than running them, and a worker stores a
# report for every command a fleet runs.
_COLUMNS = Command.__table__.c
_READ_FOR_REPORT = db.select(
    _COLUMNS.device_id, _COLUMNS.state, _COLUMNS.device_reported_at, _COLUMNS.delivered_at, _COLUMNS.started_at
).where(_COLUMNS.id == db.bindparam("command_id"))
_PROGRESS_FIELDS = ("state", "device_reported_at", "delivered_at", "started_at")
_FINAL_FIELDS = (*_PROGRESS_FIELDS, "return_value", "error", "truncated", "finished_at", "completed_at",
                 "next_attempt_at")


def _report_update(fields):
    return (
        db.update(Command.__table__)
        .where(_COLUMNS.id == db.bindparam("command_id"), _COLUMNS.state == db.bindparam("was"))
        .values({name: db.bindparam(name) for name in fields})
    )


_STORE_PROGRESS, _STORE_FINAL = _report_update(_PROGRESS_FIELDS), _report_update(_FINAL_FIELDS)


def _advance_update(state: str):
    """The UPDATE storing a report of `state` on a command of this device that it moves forward
    (an unfinished state of no higher rank); the columns kept are kept by the statement itself."""
    earlier = [s for s in wire.COMMAND_STATES
               if s not in wire.FINAL_COMMAND_STATES and wire.command_rank(s) <= wire.command_rank(state)]
    now = db.bindparam("now", type_=_COLUMNS.completed_at.type)
    values = {
        "state": state,
        "device_reported_at": db.bindparam("device_reported_at"),
        "delivered_at": db.func.coalesce(_COLUMNS.delivered_at, now),
        "started_at": db.func.coalesce(db.bindparam("reported_start", type_=_COLUMNS.started_at.type),
                                       _COLUMNS.started_at),
    }
    if state in wire.FINAL_COMMAND_STATES:
        values.update({name: db.bindparam(name) for name in ("return_value", "error", "truncated", "finished_at")},
                      completed_at=now, next_attempt_at=None)
    # The states it may move forward from are part of the statement: the parameters are only the report's values.
    return (
        db.update(Command.__table__)
        .where(_COLUMNS.id == db.bindparam("command_id"), _COLUMNS.device_id == db.bindparam("of_device"),
               _COLUMNS.state.in_([db.literal(s, _COLUMNS.state.type) for s in earlier]))
        .values(values)
    )


# The usual report's only statement, built once per state.
_ADVANCE = {state: _advance_update(state) for state in wire.COMMAND_REPORT_STATES}


def _advance(device, command_id: str, report: wire.CommandResult) -> bool:
    """Store the report if it moves an unfinished command of this device forward; False if it does not."""
    outcome = db.session.connection().execute(_ADVANCE[report.state], _advance_parameters(device, command_id, report))
    return outcome.rowcount == 1


def _advance_parameters(device, command_id: str, report: wire.CommandResult) -> dict:
    state = report.state
    values = {
        "command_id": command_id,
        "of_device": device.id,
        "device_reported_at": report.ts,
        "reported_start": _moment(report.started_at),
    }
    if state in wire.FINAL_COMMAND_STATES:
        values.update(return_value=report.return_value, error=report.error, truncated=report.truncated,
                      finished_at=_moment(report.finished_at))
    values["now"] = utcnow()
    return values


def _update_from_report(device, command_id: str, report: wire.CommandResult) -> bool:
    """False when the command's state changed between the read and the write."""
    current = db.session.execute(_READ_FOR_REPORT, {"command_id": command_id}).first()
    if current is None or current.device_id != device.id:
        raise Rejected(f"command {command_id} is not a command of device {device.id}")
    state = report.state
    if current.state in wire.FINAL_COMMAND_STATES and current.device_reported_at is not None:
        return True  # QoS 1 duplicates and late progress never change a finished command
    if current.state in wire.FINAL_COMMAND_STATES:
        # Only a server-side `expired` gets here: the device ran it after all, and it knows best.
        log.warning("command=%s was marked %s, but the device reports %s", command_id, current.state, state)
    elif wire.command_rank(state) < wire.command_rank(current.state):
        return True  # progress that arrived after later news
    now = utcnow()
    values = {
        "command_id": command_id,
        "was": current.state,
        "state": state,
        "device_reported_at": report.ts,
        "delivered_at": current.delivered_at or now,
        "started_at": _moment(report.started_at) or current.started_at,
    }
    statement = _STORE_PROGRESS
    if state in wire.FINAL_COMMAND_STATES:
        statement = _STORE_FINAL
        values.update(
            return_value=report.return_value,
            error=report.error,
            truncated=report.truncated,
            finished_at=_moment(report.finished_at),
            completed_at=now,
            next_attempt_at=None,
        )
    return db.session.execute(statement, values).rowcount == 1
