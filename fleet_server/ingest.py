"""Recording what devices report. The topic names the device; the payload is never trusted for that."""
import contextlib
import logging
from datetime import datetime, timezone

from fleet_device import wire

from .extensions import db
from .logbook.service import record_telemetry
from .models import Deployment, Device, Release, release_devices

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A well-formed message that does not fit the device or release it names."""


def record_deployment(device, report: dict) -> Deployment:
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


def _supersede_others(device, release: Release):
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


_device = Device.__table__
# Built once: building a statement cost more than running it.
_STORE_STATUS = (
    db.update(_device)
    .where(_device.c.id == db.bindparam("device_id"))
    .values(online=db.bindparam("online"), last_seen_at=db.bindparam("seen"),
            # A status without the agent's version keeps the one known.
            agent_version=db.func.coalesce(db.bindparam("agent_version", type_=_device.c.agent_version.type),
                                           _device.c.agent_version))
)


def record_status(device, status: dict):
    db.session.connection().execute(_STORE_STATUS, {
        "device_id": device.id, "online": status["state"] == "online", "seen": datetime.now(timezone.utc),
        "agent_version": status.get("agent_version") or None,
    })


def record_command_result(device, result: dict):
    from .commands.service import record_result  # imported late: the commands package imports this module

    return record_result(device, result)


# Each handler is called with the device the topic names, as a row of its id and unit_id
# (all any of them needs), and the decoded message; it writes in the caller's transaction.
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
    return handle_batch([(topic, payload)])[0]


def handle_batch(messages) -> list[bool]:
    """Validate and store device messages [(topic, payload)] in one transaction; one verdict each.

    True: stored. False: rejected (logged; nothing of it written). Each message is recorded
    inside a savepoint, so a rejected one undoes only its own writes and the others are
    committed together: one commit (one fsync) for the lot instead of one per message.
    A database error propagates with nothing committed.
    """
    decoded = []
    for topic, payload in messages:
        try:
            decoded.append(_decode(topic, payload))
        except wire.WireError as exc:
            log.warning("rejected device message topic=%s reason=%s", topic, exc)
            decoded.append(None)
    wanted = {where.unit_id for where, message in filter(None, decoded) if message is not None}
    if not wanted:
        return [entry is not None for entry in decoded]
    _begin_writing()
    # Handlers are given the device as an (id, unit_id) row: none needs more of it.
    devices = {device.unit_id: device
               for device in db.session.connection().execute(_DEVICES_BY_UNIT_ID, {"unit_ids": list(wanted)})}
    # A lone message needs no savepoint: if it is rejected, undoing the whole transaction undoes
    # only its writes. That spares two statements on every report that arrives by itself.
    lone = len(messages) == 1
    verdicts = []
    for (topic, _payload), entry in zip(messages, decoded):
        if entry is None or entry[1] is None:
            verdicts.append(entry is not None)  # malformed, or a cleared retained status
            continue
        where, message = entry
        try:
            with contextlib.nullcontext() if lone else db.session.begin_nested():
                device = devices.get(where.unit_id)
                if device is None:
                    raise Rejected(f"no device has unit_id {where.unit_id}")
                _HANDLERS[where.kind][1](device, message)
            verdicts.append(True)
        except (Rejected, KeyError) as exc:
            log.warning("rejected device message topic=%s reason=%s", topic, exc)
            verdicts.append(False)
            if lone:
                db.session.rollback()
                return verdicts
    db.session.commit()
    return verdicts


_DEVICES_BY_UNIT_ID = db.select(_device.c.id, _device.c.unit_id).where(
    _device.c.unit_id.in_(db.bindparam("unit_ids", expanding=True)))


def _decode(topic: str, payload: bytes):
    """(where, message) of a well-formed message, message None for a cleared retained status; WireError if not."""
    where = wire.parse_topic(topic)
    if where.kind not in _HANDLERS:
        raise wire.WireError(f"devices do not report on {where.kind!r} topics")
    if where.kind == "status" and payload == b"":
        return where, None
    return where, wire.decode(_HANDLERS[where.kind][0], payload)


def _begin_writing():
    """Open the batch's transaction so that its savepoints nest inside it.

    pysqlite starts a transaction only at the first INSERT/UPDATE/DELETE; a SAVEPOINT issued
    before that would itself be the outermost transaction and its RELEASE would commit. So on
    SQLite the transaction is opened here, IMMEDIATE: it takes the write lock now (waiting up to
    the busy timeout), so the batch's reads and writes see one state and no later step can fail
    on a lock another writer took in between.
    """
    connection = db.session.connection()
    if connection.dialect.name == "sqlite" and not connection.connection.dbapi_connection.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
