"""Recording what devices report. The topic names the device; the payload is never trusted for that.

The dispatcher knows the kinds of report and their messages, not the features that record
them: each feature hands it its recorder (see `register_report_recorders` in fleet_server/app.py),
either one message at a time (`register`) or a batch's messages of its kind together
(`register_batch`).
"""
import contextlib
import logging
from typing import NamedTuple, Protocol

import fleet_wire as wire

from ..extensions import db
from ..models import Device

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A well-formed message that does not fit the device or release it names."""


class BatchRecorder(Protocol):
    """Records a batch's messages of one kind together (see `register_batch`).

    Made from all of them, [(device, message)], before any is recorded; `record` checks one and
    raises Rejected having written nothing (so it needs no savepoint); `store` writes what
    `record` held back, once the batch's messages were all recorded.
    """

    def record(self, device, message) -> None: ...

    def store(self) -> None: ...


# The message each kind of report carries.
_MESSAGES = {
    "deployments": wire.DeploymentReport,
    "status": wire.Status,
    "telemetry": wire.TelemetryBatch,
    "results": wire.CommandResult,
}
KINDS = tuple(_MESSAGES)
# Each recorder is called with the device the topic names, as a row of its id and unit_id (all
# any of them needs), and the decoded message; it writes in the caller's transaction.
_RECORDERS = {}
# kind -> the BatchRecorder class of the features that record a batch's messages together.
_BATCH_RECORDERS = {}


def register(kind: str, recorder):
    """Have `recorder(device, message)` record the reports of this kind, one at a time (a later one replaces it)."""
    _check_kind(kind)
    _BATCH_RECORDERS.pop(kind, None)
    _RECORDERS[kind] = recorder


def register_batch(kind: str, recorder_class: type[BatchRecorder]):
    """Have a `recorder_class([(device, message)])` record each batch's reports of this kind together."""
    _check_kind(kind)
    _RECORDERS.pop(kind, None)
    _BATCH_RECORDERS[kind] = recorder_class


def _check_kind(kind: str):
    if kind not in _MESSAGES:
        raise ValueError(f"devices report no {kind!r} messages")


def handle_message(topic: str, payload: bytes) -> bool:
    """Validate and store one device message in its own transaction.

    Returns False when the message was rejected (nothing written).
    """
    return handle_batch([(topic, payload)])[0]


def handle_batch(messages) -> list[bool]:
    """Validate and store device messages [(topic, payload)] in one transaction; True for each one stored."""
    return [reason is None for reason in store_batch(messages)]


def store_batch(messages) -> list[str | None]:
    """Validate and store device messages [(topic, payload)] in one transaction; one verdict each.

    None: stored. A reason: rejected (nothing of it written; the caller keeps it as a dead letter).
    Each message is recorded inside a savepoint, so a rejected one undoes only its own writes and
    the others are committed together: one commit (one fsync) for the lot instead of one per
    message. A batch recorder checks a message before it writes anything of it, so its messages need
    none (see BatchRecorder). A database error propagates with nothing committed.
    """
    decoded, reasons = [], []
    for topic, payload in messages:
        try:
            decoded.append(_decode(topic, payload))
            reasons.append(None)
        except wire.WireError as exc:
            decoded.append(None)
            reasons.append(str(exc))
    wanted = {where.unit_id for where, message in filter(None, decoded) if message is not None}
    if not wanted:
        return reasons
    _begin_writing()
    devices = _devices(wanted)
    batches = _batch_recorders(devices, decoded)
    # A lone message needs no savepoint: if it is rejected, undoing the whole transaction undoes
    # only its writes. That spares two statements on every report that arrives by itself.
    lone = len(messages) == 1
    for position, entry in enumerate(decoded):
        if entry is None or entry[1] is None:
            continue  # malformed (its reason is set), or a cleared retained status
        where, message = entry
        try:
            device = devices.get(where.unit_id)
            if device is None:
                raise Rejected(f"no device has unit_id {where.unit_id}")
            if where.kind in batches:
                batches[where.kind].record(device, message)  # checks before it writes: no savepoint needed
            else:
                recorder = _RECORDERS.get(where.kind)
                if recorder is None:
                    raise Rejected(f"nothing records {where.kind} reports on this server")
                with contextlib.nullcontext() if lone else db.session.begin_nested():
                    recorder(device, message)
        except (Rejected, KeyError) as exc:
            reasons[position] = str(exc) if isinstance(exc, Rejected) else f"no such key: {exc}"
            if lone:
                db.session.rollback()
                return reasons
    for recorder in batches.values():
        recorder.store()
    db.session.commit()
    return reasons


def _batch_recorders(devices, decoded) -> dict[str, BatchRecorder]:
    """{kind: recorder} for the kinds recorded a batch at a time that this batch holds from known devices."""
    messages = {}
    for where, message in filter(None, decoded):
        if where.kind in _BATCH_RECORDERS and message is not None and where.unit_id in devices:
            messages.setdefault(where.kind, []).append((devices[where.unit_id], message))
    return {kind: _BATCH_RECORDERS[kind](pairs) for kind, pairs in messages.items()}


_device = Device.__table__
_DEVICES_BY_UNIT_ID = db.select(_device.c.id, _device.c.unit_id).where(
    _device.c.unit_id.in_(db.bindparam("unit_ids", expanding=True)))
# A quiet fleet's reports come one at a time: one device, by a statement with no list to expand.
_DEVICE_BY_UNIT_ID = db.select(_device.c.id, _device.c.unit_id).where(_device.c.unit_id == db.bindparam("unit_id"))


class DeviceRow(NamedTuple):
    """What handlers are given of the device a topic names: none needs more of it."""

    id: str
    unit_id: str


def _devices(unit_ids: set) -> dict:
    """{unit_id: DeviceRow} of the devices that exist among `unit_ids`."""
    connection = db.session.connection()
    if len(unit_ids) == 1:
        rows = connection.execute(_DEVICE_BY_UNIT_ID, {"unit_id": next(iter(unit_ids))})
    else:
        rows = connection.execute(_DEVICES_BY_UNIT_ID, {"unit_ids": list(unit_ids)})
    return {unit_id: DeviceRow(device_id, unit_id) for device_id, unit_id in rows}


def _decode(topic: str, payload: bytes):
    """(where, message) of a well-formed message, message None for a cleared retained status; WireError if not."""
    where = wire.parse_topic(topic)
    if where.kind not in _MESSAGES:
        raise wire.WireError(f"devices do not report on {where.kind!r} topics")
    if where.kind == "status" and payload == b"":
        return where, None
    return where, wire.decode(_MESSAGES[where.kind], payload)


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
