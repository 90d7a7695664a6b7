"""Recording what devices report. The topic names the device; the payload is never trusted for that.

The dispatcher knows the kinds of report and their messages, not the features that record
them: each feature hands it its recorder with `register(kind, handler)` (see
fleet_server/app.py). Deployment reports and statuses touch only the core models and are
recorded here.
"""
import contextlib
import logging
from datetime import datetime, timezone
from typing import NamedTuple

import fleet_wire as wire

from ..driver_statements import DriverStatement
from ..extensions import db
from ..models import Deployment, Device, Release, release_devices

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A well-formed message that does not fit the device or release it names."""


class DeploymentReports:
    """A batch's deployment reports, recorded with a few statements for the whole batch.

    Built from all the batch's reports, it reads in two queries what checking them needs: the
    project of each release they name, and each (release, device) pair those releases target
    with the deployment stored for it, if any. `record` checks one report against that and
    holds its write back; `store` writes what is held back, one INSERT and one UPDATE for the
    lot. A report `record` rejects has written nothing, so it needs no savepoint of its own.
    A `succeeded` report is written at once, with the others held back before it, because it
    supersedes the device's other succeeded deployments of the project: an UPDATE of rows this
    batch may not have read, which must see every earlier report of the batch.
    """

    def __init__(self, reports):
        """`reports`: [(device, report)], the device as an (id, unit_id) row."""
        connection = db.session.connection()
        release_ids = list({report.release_id for _device, report in reports})
        self.project_of = dict(connection.execute(_PROJECTS_OF_RELEASES, {"release_ids": release_ids}).all())
        self.targeted = set()
        # (release_id, device_id) -> the deployment's fields as they stand after the reports seen so far
        self.latest = {}
        for release_id, device_id, deployment_id, state, step, detail, reported_at in connection.execute(
                _TARGETED_DEPLOYMENTS,
                {"release_ids": release_ids, "device_ids": list({device.id for device, _report in reports})}):
            self.targeted.add((release_id, device_id))
            if deployment_id is not None:
                self.latest[release_id, device_id] = {
                    "state": state, "step": step, "detail": detail, "reported_at": reported_at}
        self.stored = set(self.latest)  # the pairs whose deployment row exists
        self.held_back = {}  # (release_id, device_id) -> the fields to write

    def record(self, device, report: wire.DeploymentReport):
        """Check one report of the batch and hold its write back; Rejected (nothing written) if it does not fit."""
        release_id = report.release_id
        if self.project_of.get(release_id) != report.project_id:
            raise Rejected(f"release {release_id} of project {report.project_id} does not exist")
        key = (release_id, device.id)
        if key not in self.targeted:
            raise Rejected(f"release {release_id} does not target device {device.id}")
        latest = self.latest.get(key)
        if latest is not None and report.ts < latest["reported_at"]:
            return  # QoS 1 may deliver late duplicates: older news never overwrites newer
        fields = {"state": report.state, "step": report.step, "detail": report.detail,
                  "reported_at": report.ts}
        if fields != latest:  # the same news again changes nothing, not even updated_at
            self.latest[key] = self.held_back[key] = fields
        if report.state == "succeeded":
            self.store()
            self._supersede_others(device, release_id)

    def store(self):
        """Write the held-back reports: new deployments in one INSERT, changed ones in one UPDATE."""
        if not self.held_back:
            return
        new, changed = [], []
        for (release_id, device_id), fields in self.held_back.items():
            if (release_id, device_id) in self.stored:
                changed.append({"key_release_id": release_id, "key_device_id": device_id, **fields})
            else:
                new.append({"release_id": release_id, "device_id": device_id, **fields})
        connection = db.session.connection()
        if new:
            connection.execute(_deployment.insert(), new)
        if changed:
            connection.execute(_UPDATE_DEPLOYMENT, changed)
        self.stored.update(self.held_back)
        self.held_back.clear()

    def _supersede_others(self, device, release_id: int):
        """A device runs one release per project: the others it ran are no longer deployed."""
        project_id, detail = self.project_of[release_id], f"replaced by release {release_id}"
        db.session.connection().execute(_SUPERSEDE, {
            "of_device": device.id, "succeeded_release": release_id, "of_project": project_id, "replaced_by": detail})
        # What this batch knows of those deployments must say what the UPDATE just did.
        for (other_release_id, device_id), fields in self.latest.items():
            if (device_id == device.id and other_release_id != release_id and fields["state"] == "succeeded"
                    and self.project_of[other_release_id] == project_id):
                fields.update(state="superseded", detail=detail)


_deployment, _release = Deployment.__table__, Release.__table__
# Built once: building a statement cost more than running it.
_PROJECTS_OF_RELEASES = db.select(_release.c.id, _release.c.project_id).where(
    _release.c.id.in_(db.bindparam("release_ids", expanding=True)))
_TARGETED_DEPLOYMENTS = (
    db.select(release_devices.c.release_id, release_devices.c.device_id, _deployment.c.id, _deployment.c.state,
              _deployment.c.step, _deployment.c.detail, _deployment.c.reported_at)
    .outerjoin(_deployment, db.and_(_deployment.c.release_id == release_devices.c.release_id,
                                    _deployment.c.device_id == release_devices.c.device_id))
    .where(release_devices.c.release_id.in_(db.bindparam("release_ids", expanding=True)),
           release_devices.c.device_id.in_(db.bindparam("device_ids", expanding=True)))
)
# The SET clause is the executemany rows' other keys: state, step, detail, reported_at (and updated_at).
_UPDATE_DEPLOYMENT = _deployment.update().where(_deployment.c.release_id == db.bindparam("key_release_id"),
                                                _deployment.c.device_id == db.bindparam("key_device_id"))
_SUPERSEDE = (
    _deployment.update()
    .where(_deployment.c.device_id == db.bindparam("of_device"), _deployment.c.state == "succeeded",
           _deployment.c.release_id != db.bindparam("succeeded_release"),
           _deployment.c.release_id.in_(
               db.select(_release.c.id).where(_release.c.project_id == db.bindparam("of_project"))))
    .values(state="superseded", detail=db.bindparam("replaced_by"))
)


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


def record_status(device, status: wire.Status):
    db.session.connection().execute(_STORE_STATUS, {
        "device_id": device.id, "online": status.state == "online", "seen": datetime.now(timezone.utc),
        "agent_version": status.agent_version or None,
    })


# Each handler is called with the device the topic names, as a row of its id and unit_id
# (all any of them needs), and the decoded message; it writes in the caller's transaction.
_HANDLERS = {
    "deployments": (wire.DeploymentReport, None),  # recorded a batch at a time: see DeploymentReports
    "status": (wire.Status, record_status),
    "telemetry": (wire.TelemetryBatch, None),  # recorded by the logbook
    "results": (wire.CommandResult, None),  # recorded by the commands
}
KINDS = tuple(_HANDLERS)


def register(kind: str, handler):
    """Have `handler(device, message)` record the reports of this kind (one handler a kind; a later one replaces it)."""
    if kind not in _HANDLERS or kind == "deployments":
        raise ValueError(f"devices report no {kind!r} messages that a feature records")
    _HANDLERS[kind] = (_HANDLERS[kind][0], handler)


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
    message. Deployment reports are checked before anything of theirs is written, so they need
    none (see DeploymentReports). A database error propagates with nothing committed.
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
    deployment_reports = _deployment_reports(devices, decoded)
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
            if where.kind == "deployments":
                deployment_reports.record(device, message)  # checks before it writes: no savepoint needed
            else:
                handler = _HANDLERS[where.kind][1]
                if handler is None:
                    raise Rejected(f"nothing records {where.kind} reports on this server")
                with contextlib.nullcontext() if lone else db.session.begin_nested():
                    handler(device, message)
        except (Rejected, KeyError) as exc:
            reasons[position] = str(exc) if isinstance(exc, Rejected) else f"no such key: {exc}"
            if lone:
                db.session.rollback()
                return reasons
    if deployment_reports is not None:
        deployment_reports.store()
    db.session.commit()
    return reasons


def _deployment_reports(devices, decoded) -> DeploymentReports | None:
    """The batch's deployment reports from known devices, preloaded; None if it holds none."""
    reports = [(devices[where.unit_id], message) for where, message in filter(None, decoded)
               if where.kind == "deployments" and where.unit_id in devices]
    return DeploymentReports(reports) if reports else None


_DEVICES_BY_UNIT_ID = db.select(_device.c.id, _device.c.unit_id).where(
    _device.c.unit_id.in_(db.bindparam("unit_ids", expanding=True)))
# A quiet fleet's reports come one at a time: one device, read on the driver (DriverStatement).
_DEVICE_BY_UNIT_ID = DriverStatement(db.select(_device.c.id, _device.c.unit_id).where(
    _device.c.unit_id == db.bindparam("unit_id")))


class DeviceRow(NamedTuple):
    """What handlers are given of the device a topic names: none needs more of it."""

    id: str
    unit_id: str


def _devices(unit_ids: set) -> dict:
    """{unit_id: DeviceRow} of the devices that exist among `unit_ids`."""
    connection = db.session.connection()
    if len(unit_ids) == 1:
        rows = _DEVICE_BY_UNIT_ID.rows(connection, {"unit_id": next(iter(unit_ids))})
    else:
        rows = connection.execute(_DEVICES_BY_UNIT_ID, {"unit_ids": list(unit_ids)})
    return {unit_id: DeviceRow(device_id, unit_id) for device_id, unit_id in rows}


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
        _BEGIN_IMMEDIATE.run(connection, {})


_BEGIN_IMMEDIATE = DriverStatement(db.text("BEGIN IMMEDIATE"))
