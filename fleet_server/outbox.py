"""The outbox: retained release topics waiting to be published to devices.

A change (release created, updated or deleted, device or project deleted, registry
changed) writes rows here in its own transaction. Whoever flushes computes the
documents as the database stands at that moment and publishes them retained.

Two flushes must not interleave: if A computed a document before B's commit and
published it after B, the retained message would be stale for good. So a flush takes
one outbox-wide lock for its whole transaction (a transaction-scoped advisory lock on
PostgreSQL, the database's write lock on SQLite), and reads, computes, publishes and
deletes under it. B's flush waits for A and, since it computes after B's commit,
publishes the committed state last. Holding one lock instead of one per topic costs
little: a flush publishes its batches pipelined, so it is short.
"""
import logging

from flask import current_app

from fleet_device import wire

from .extensions import db
from .models import Device, Publication, Release, release_devices, utcnow

log = logging.getLogger(__name__)

_LOCK_KEY = 0x466C6565  # the advisory lock id of the outbox on PostgreSQL


def enqueue(unit_ids, project_id: int):
    """Record, in the caller's transaction, that these devices' topic for the project changed."""
    enqueue_pairs((unit_id, project_id) for unit_id in unit_ids)


def enqueue_pairs(pairs):
    """Record, in the caller's transaction, that these (unit_id, project_id) topics changed."""
    now = utcnow()
    rows = [{"unit_id": unit_id, "project_id": project_id, "created_at": now} for unit_id, project_id in set(pairs)]
    if rows:  # one multi-row INSERT: a fleet-wide release is thousands of rows
        db.session.execute(db.insert(Publication), rows)


def message_for(unit_id: str, project_id: int) -> bytes:
    """The retained payload for a device's release topic of one project, as it stands now."""
    return messages_for([(unit_id, project_id)])[(unit_id, project_id)]


def messages_for(topics) -> dict[tuple[str, int], bytes]:
    """The retained payload of each (unit_id, project_id) topic as the database stands now.

    A few queries for the whole batch, and each (project, release) serialised once
    however many devices it goes to. A device no longer known gets an empty payload,
    which clears its retained topic on the broker.
    """
    from .registries.service import credentials_for
    from .releases.service import release_document

    topics = list(topics)
    units = {unit_id for unit_id, _project in topics}
    projects = {project_id for _unit, project_id in topics}
    devices = dict(db.session.execute(db.select(Device.unit_id, Device.id).where(Device.unit_id.in_(units))).all())
    # The active release of (device, project): the newest release of the project listing the device.
    active = {
        (device_id, project_id): release_id
        for device_id, project_id, release_id in db.session.execute(
            db.select(release_devices.c.device_id, Release.project_id, db.func.max(Release.id))
            .join(Release, Release.id == release_devices.c.release_id)
            .where(release_devices.c.device_id.in_(list(devices.values())), Release.project_id.in_(projects))
            .group_by(release_devices.c.device_id, Release.project_id)
        )
    }
    payloads, messages = {}, {}
    for unit_id, project_id in topics:
        device_id = devices.get(unit_id)
        if device_id is None:
            messages[(unit_id, project_id)] = b""
            continue
        release_id = active.get((device_id, project_id))
        if (project_id, release_id) not in payloads:
            release = db.session.get(Release, release_id) if release_id is not None else None
            document = {
                "project_id": project_id,
                "release": release_document(release) if release else None,
                # Decrypted credentials go only on this device's own topic, and only those its release uses.
                "registries": credentials_for(release) if release else [],
            }
            payloads[(project_id, release_id)] = wire.encode(wire.release_message, document)
        messages[(unit_id, project_id)] = payloads[(project_id, release_id)]
    return messages


def lock_outbox():
    """Hold, until the transaction ends, the lock that serialises flushes across processes."""
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(db.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:
        # Any write statement takes SQLite's database-wide write lock, even one that changes no row.
        db.session.execute(db.update(Publication).where(Publication.id < 0).values(project_id=Publication.project_id))


def flush(publish_many, limit: int = 20000, batch: int = 1000) -> int:
    """Publish pending rows with `publish_many([(topic, payload)]) -> [acknowledged]`; returns how many were sent.

    Rows for the same device and project collapse into one publication of the current
    state. A batch is published at once and its acknowledgements awaited together (one
    round trip per batch, not one per device). Only rows read under the lock, of topics
    the broker acknowledged, are deleted.
    """
    db.session.rollback()
    if db.session.scalar(db.select(Publication.id).limit(1)) is None:
        db.session.rollback()
        return 0  # nothing to do: do not take the lock (the worker sweeps every second)
    lock_outbox()
    pending = db.session.execute(
        db.select(Publication.id, Publication.unit_id, Publication.project_id).order_by(Publication.id).limit(limit)
    ).all()
    row_ids: dict[tuple[str, int], list[int]] = {}
    for row_id, unit_id, project_id in pending:
        row_ids.setdefault((unit_id, project_id), []).append(row_id)
    topics = list(row_ids)
    sent = 0
    try:
        for start in range(0, len(topics), batch):
            chunk = topics[start:start + batch]
            messages = messages_for(chunk)
            confirmed = publish_many([(wire.release_topic(*topic), messages[topic]) for topic in chunk])
            done = [row_id for topic, ok in zip(chunk, confirmed) if ok for row_id in row_ids[topic]]
            for offset in range(0, len(done), 500):
                db.session.execute(db.delete(Publication).where(Publication.id.in_(done[offset:offset + 500])))
            sent += sum(confirmed)
            if not all(confirmed):
                break
        db.session.commit()
    finally:
        db.session.rollback()
    return sent


def flush_after_commit():
    """Try to publish right away; whatever the broker does not take stays for the worker's sweep."""
    from .mqtt import publisher_for

    publisher = publisher_for(current_app)
    if not publisher.ready():
        return  # do not hold the lock waiting for a broker that is away; the sweep publishes later
    try:
        flush(lambda messages: publisher.publish_many(messages, retain=True))
    except Exception:  # the request already succeeded; the sweep retries
        log.exception("outbox flush failed; the worker will retry")
        db.session.rollback()
