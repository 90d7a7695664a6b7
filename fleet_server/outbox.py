"""The outbox: retained release topics waiting to be published to devices."""
import logging

from flask import current_app

from fleet_device import wire

from .extensions import db
from .models import Device, Publication

log = logging.getLogger(__name__)


def enqueue(unit_ids, project_id: int):
    """Record, in the caller's transaction, that these devices' topic for the project changed."""
    db.session.add_all(Publication(unit_id=unit_id, project_id=project_id) for unit_id in unit_ids)


def message_for(unit_id: str, project_id: int, payloads: dict | None = None) -> bytes:
    """The retained payload for a device's release topic of one project, as it stands now.

    `payloads` caches payloads by release id across the devices of one flush: a
    fleet-wide release is serialised and validated once, not once per device.
    """
    from .releases.service import active_release, release_document

    device = db.session.scalar(db.select(Device).filter_by(unit_id=unit_id))
    if device is None:
        return b""  # an empty retained message clears the topic on the broker
    release = active_release(device, project_id)
    key = (project_id, release.id if release else None)
    payloads = {} if payloads is None else payloads
    if key not in payloads:
        document = {"project_id": project_id, "release": release_document(release) if release else None}
        payloads[key] = wire.encode(wire.release_message, document)
    return payloads[key]


def flush(publish_many, limit: int = 10000, batch: int = 1000) -> int:
    """Publish pending rows with `publish_many([(topic, payload)]) -> [acknowledged]`; returns how many were sent.

    Rows for the same device and project collapse into one publication of the current state.
    A batch is published at once and its acknowledgements awaited together (one round trip
    per batch instead of one per device); the rows of the acknowledged ones are deleted.
    """
    rows = db.session.execute(
        db.select(Publication.unit_id, Publication.project_id, db.func.max(Publication.id))
        .group_by(Publication.unit_id, Publication.project_id)
        .order_by(db.func.min(Publication.id))
        .limit(limit)
    ).all()
    sent = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        payloads = {}
        messages = [
            (wire.release_topic(unit_id, project_id), message_for(unit_id, project_id, payloads))
            for unit_id, project_id, _newest in chunk
        ]
        confirmed = publish_many(messages)
        for (unit_id, project_id, newest), acknowledged in zip(chunk, confirmed):
            if acknowledged:
                db.session.execute(
                    db.delete(Publication).where(
                        Publication.unit_id == unit_id, Publication.project_id == project_id,
                        Publication.id <= newest,
                    )
                )
        db.session.commit()
        sent += sum(confirmed)
        if not all(confirmed):
            break
    db.session.rollback()
    return sent


def flush_after_commit():
    """Try to publish right away; whatever the broker does not take stays for the worker's sweep."""
    from .mqtt import publisher_for

    publisher = publisher_for(current_app)
    try:
        flush(lambda messages: publisher.publish_many(messages, retain=True))
    except Exception:  # the request already succeeded; the sweep retries
        log.exception("outbox flush failed; the worker will retry")
        db.session.rollback()
