"""The outbox: retained release topics waiting to be published to devices.

A change (release created, updated or deleted, device or project deleted, registry
changed) writes rows here in its own transaction. Whoever flushes computes the
document as the database stands at that moment and publishes it retained.

Two flushes of the same (device, project) must not interleave: if A computed its
document before B's commit and published after B, the retained message would be
stale for good. So compute + publish + delete happen inside one transaction holding
a lock on that (device, project): a transaction-scoped advisory lock on PostgreSQL,
the database's write lock on SQLite. B's flush then waits for A and, since it starts
after B's commit, publishes the committed state last.
"""
import logging
import zlib

from flask import current_app

from fleet_device import wire

from .extensions import db
from .models import Device, Publication

log = logging.getLogger(__name__)


def enqueue(unit_ids, project_id: int):
    """Record, in the caller's transaction, that these devices' topic for the project changed."""
    enqueue_pairs((unit_id, project_id) for unit_id in unit_ids)


def enqueue_pairs(pairs):
    """Record, in the caller's transaction, that these (unit_id, project_id) topics changed."""
    db.session.add_all(Publication(unit_id=unit_id, project_id=project_id) for unit_id, project_id in set(pairs))


def message_for(unit_id: str, project_id: int) -> bytes:
    """The retained payload for a device's release topic of one project, as it stands now."""
    from .registries.service import credentials_for
    from .releases.service import active_release, release_document

    device = db.session.scalar(db.select(Device).filter_by(unit_id=unit_id))
    if device is None:
        return b""  # an empty retained message clears the topic on the broker
    release = active_release(device, project_id)
    document = {
        "project_id": project_id,
        "release": release_document(release) if release else None,
        # Decrypted credentials go only on this device's own topic, and only those its release uses.
        "registries": credentials_for(release) if release else [],
    }
    return wire.encode(wire.release_message, document)


def lock_topic(unit_id: str, project_id: int):
    """Hold, until the transaction ends, the lock that serialises flushes of one (device, project)."""
    if db.session.get_bind().dialect.name == "postgresql":
        # Two int4 keys: a checksum of the unit id and the project; a collision only serialises more.
        key = zlib.crc32(unit_id.encode()) - 2**31
        db.session.execute(db.text("SELECT pg_advisory_xact_lock(:key, :project)"), {"key": key, "project": project_id})
    else:
        # Any write statement takes SQLite's database-wide write lock, even one that changes no row.
        db.session.execute(
            db.update(Publication).where(Publication.id < 0).values(project_id=Publication.project_id)
        )


def flush(publish, limit: int = 1000) -> int:
    """Publish pending rows with `publish(topic, payload) -> bool`; returns how many were sent.

    Rows for the same device and project collapse into one publication of the current state.
    """
    rows = db.session.execute(
        db.select(Publication.unit_id, Publication.project_id)
        .group_by(Publication.unit_id, Publication.project_id)
        .order_by(db.func.min(Publication.id))
        .limit(limit)
    ).all()
    db.session.rollback()
    sent = 0
    for unit_id, project_id in rows:
        lock_topic(unit_id, project_id)
        newest = db.session.scalar(
            db.select(db.func.max(Publication.id)).filter_by(unit_id=unit_id, project_id=project_id)
        )
        if newest is None:  # another process published it while this one waited for the lock
            db.session.rollback()
            continue
        topic = wire.release_topic(unit_id, project_id)
        if not publish(topic, message_for(unit_id, project_id)):
            db.session.rollback()
            break
        db.session.execute(
            db.delete(Publication).where(
                Publication.unit_id == unit_id, Publication.project_id == project_id, Publication.id <= newest
            )
        )
        db.session.commit()
        sent += 1
    db.session.rollback()
    return sent


def flush_after_commit():
    """Try to publish right away; whatever the broker does not take stays for the worker's sweep."""
    from .mqtt import publisher_for

    publisher = publisher_for(current_app)
    if not publisher.ready():
        return  # do not hold a lock waiting for a broker that is away; the sweep publishes later
    try:
        flush(lambda topic, payload: publisher.publish(topic, payload, retain=True))
    except Exception:  # the request already succeeded; the sweep retries
        log.exception("outbox flush failed; the worker will retry")
        db.session.rollback()
