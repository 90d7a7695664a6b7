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

Every document carries `seq`, taken from one database sequence under that lock at each
flush, so a later publication always carries a higher seq and a device can refuse anything
older than what it has seen (a broker restored from an old snapshot, say). The workers keep
a retained marker on the broker holding the highest seq published (see `publish_marker` and
`reconcile_with_marker`): a broker that comes back without it, or with an older one, lost
state, and every release topic ever published is published again.
"""
import contextlib
import logging
import threading
import time

from flask import current_app

import fleet_wire as wire

from ..extensions import db
from ..models import Device, Publication, Release, ReleaseSeqState, ReleaseTopic, release_devices, utcnow
from .mqtt import make_client, process_client_id, publisher_for

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


def init_app(app, release_contents):
    """Hand the outbox the builder of what a release topic carries of a release.

    `release_contents(release) -> {"release": document, "registries": [credentials]}` comes
    from the releases feature; the outbox itself knows only topics, seqs and publishing.
    """
    app.extensions["fleet_release_contents"] = release_contents


_NO_RELEASE = {"release": None, "registries": []}


def messages_for(topics, seq: int) -> dict[tuple[str, int], bytes]:
    """The retained payload of each (unit_id, project_id) topic as the database stands now, carrying `seq`.

    A few queries for the whole batch, and each (project, release) serialised once
    however many devices it goes to. A device no longer known gets an empty payload,
    which clears its retained topic on the broker.
    """
    release_contents = current_app.extensions["fleet_release_contents"]
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
            contents = release_contents(release) if release else _NO_RELEASE
            payloads[(project_id, release_id)] = wire.encode(wire.ReleaseMessage(seq=seq, project_id=project_id, **contents))
        messages[(unit_id, project_id)] = payloads[(project_id, release_id)]
    return messages


def lock_outbox():
    """Hold, until the transaction ends, the lock that serialises flushes across processes."""
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(db.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:
        # Any write statement takes SQLite's database-wide write lock, even one that changes no row.
        db.session.execute(db.update(Publication).where(Publication.id < 0).values(project_id=Publication.project_id))


def _on_postgresql() -> bool:
    return db.session.get_bind().dialect.name == "postgresql"


def take_seq() -> int:
    """The next release seq. Taken under the outbox lock, so seqs reach the broker in the order taken."""
    if _on_postgresql():
        return db.session.scalar(db.text("SELECT nextval('release_seq')"))
    seq = db.session.scalar(db.update(ReleaseSeqState).where(ReleaseSeqState.id == 1)
                            .values(issued=ReleaseSeqState.issued + 1).returning(ReleaseSeqState.issued))
    if seq is None:  # a database made without the migration's row
        db.session.add(ReleaseSeqState(id=1, issued=1, published=0))
        seq = 1
    return seq


def highest_issued() -> int:
    if _on_postgresql():
        return db.session.scalar(db.text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM release_seq"))
    return db.session.scalar(db.select(ReleaseSeqState.issued).where(ReleaseSeqState.id == 1)) or 0


def highest_published() -> int:
    """The highest seq the broker acknowledged on a release topic."""
    return db.session.scalar(db.select(ReleaseSeqState.published).where(ReleaseSeqState.id == 1)) or 0


def _record_published(seq: int):
    db.session.execute(db.update(ReleaseSeqState).where(ReleaseSeqState.id == 1, ReleaseSeqState.published < seq)
                       .values(published=seq))


def move_seq_past(floor: int) -> int:
    """Make every seq issued from now on higher than `floor`, in the caller's transaction; the highest issued now.

    For a database restored from a backup: devices remember higher seqs than it knows of.
    Call under the outbox lock.
    """
    current = highest_issued()
    if floor <= current:
        return current
    if _on_postgresql():
        db.session.execute(db.text("SELECT setval('release_seq', :floor)"), {"floor": floor})
    else:
        db.session.execute(db.update(ReleaseSeqState).where(ReleaseSeqState.id == 1).values(issued=floor))
    log.warning("release seq moved from %d to %d", current, floor)
    return floor


# The same on both databases; as text, executemany goes straight to the driver, which halves
# the cost of a fleet-wide release's 10,000 rows against the dialects' insert constructs.
_REMEMBER_TOPIC = db.text("INSERT INTO release_topic (unit_id, project_id) VALUES (:unit_id, :project_id)"
                          " ON CONFLICT DO NOTHING")


def _remember_topics(topics):
    """Add these (unit_id, project_id) topics to those ever published (see ReleaseTopic)."""
    rows = [{"unit_id": unit_id, "project_id": project_id} for unit_id, project_id in topics]
    if rows:
        db.session.execute(_REMEMBER_TOPIC, rows)


def republish_everything() -> int:
    """Queue, in the caller's transaction, every release topic ever published; how many."""
    count = db.session.scalar(db.select(db.func.count()).select_from(ReleaseTopic))
    db.session.execute(db.insert(Publication).from_select(
        ["unit_id", "project_id", "created_at"],
        db.select(ReleaseTopic.unit_id, ReleaseTopic.project_id,
                  db.literal(utcnow(), type_=Publication.created_at.type)),
    ))
    return count


def flush(publish_many, limit: int = 20000, batch: int = 1000) -> int:
    """Publish pending rows with `publish_many([(topic, payload)]) -> [acknowledged]`; returns how many were sent.

    Rows for the same device and project collapse into one publication of the current
    state, carrying one seq for the whole flush. A batch is published at once and its
    acknowledgements awaited together (one round trip per batch, not one per device). Only
    rows read under the lock, of topics the broker acknowledged, are deleted.
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
    seq = take_seq()
    sent = 0
    try:
        try:
            for start in range(0, len(topics), batch):
                chunk = topics[start:start + batch]
                messages = messages_for(chunk, seq)
                confirmed = publish_many([(wire.release_topic(*topic), messages[topic]) for topic in chunk])
                published = [topic for topic, ok in zip(chunk, confirmed) if ok]
                done = [row_id for topic in published for row_id in row_ids[topic]]
                for offset in range(0, len(done), 500):
                    db.session.execute(db.delete(Publication).where(Publication.id.in_(done[offset:offset + 500])))
                _remember_topics(published)
                sent += len(published)
                if not all(confirmed):
                    break
        except Exception:
            # What reached the broker carries this seq: keep it spent (a SQLite counter rolled
            # back would issue it again) and what was published done, then give up.
            with contextlib.suppress(Exception):
                if sent:
                    _record_published(seq)
                db.session.commit()
            raise
        if sent:
            _record_published(seq)
        db.session.commit()
    finally:
        db.session.rollback()
    return sent


def marker_payload(seq: int) -> bytes:
    return wire.encode(wire.ReleaseSeqMarker(seq=seq))


def publish_marker(publish_many, written: int) -> int:
    """Bring the broker's retained marker up to the highest seq published; the marker's value afterwards.

    `publish_many` publishes retained, as `flush` takes it. `written` is what this process last
    put there (or found there). Under the outbox lock, so that two workers never leave a lower
    marker after a higher one.
    """
    db.session.rollback()
    if highest_published() <= written:
        db.session.rollback()
        return written
    try:
        lock_outbox()
        published = highest_published()
        if publish_many([(wire.RELEASE_SEQ_MARKER_TOPIC, marker_payload(published))])[0]:
            written = published
        db.session.commit()  # nothing written: ends the transaction that holds the lock
    finally:
        db.session.rollback()
    return written


def reconcile_with_marker(read_marker) -> int:
    """After a (re)connection: compare the broker's marker with the database and repair what differs.

    `read_marker()` gives the broker's marker (None when it has none). Read after the
    database's highest published seq, so a flush in between cannot make a broker that lost
    state look complete. A marker behind (or missing while something was published) means the
    broker lost retained messages: every topic ever published is queued again. A marker ahead
    of every seq issued means the database is older than the broker (restored from a backup):
    the sequence moves past it first. Returns the marker's value (0 when missing).
    """
    db.session.rollback()
    published = highest_published()
    db.session.rollback()
    marker = read_marker()
    try:
        lock_outbox()
        issued = highest_issued()
        if marker is not None and marker > issued:
            move_seq_past(max(marker, seq_floor_now()))
            count = republish_everything()
            log.warning("the broker's release seq marker %d is ahead of the database's %d (restored from a backup?);"
                        " the sequence moved past it and %d release topic(s) queued again", marker, issued, count)
        elif (marker is None and published > 0) or (marker is not None and marker < published):
            count = republish_everything()
            log.warning("the broker lost retained releases (its seq marker is %s, %d was published);"
                        " %d release topic(s) queued again", marker, published, count)
        db.session.commit()
    finally:
        db.session.rollback()
    return marker or 0


def read_marker(config, timeout: float = 10.0, grace: float = 2.0) -> int | None:
    """The broker's retained release seq marker, None when it has none; BrokerUnavailable if unreachable.

    Read on a connection of its own, with a clean session and a plain subscription: MQTT 5
    never delivers retained messages to shared subscriptions, and on the worker's own session
    the marker could queue behind a thousand unacknowledged reports. The broker sends a
    retained message right after the subscription's acknowledgement; `grace` bounds how long
    its absence is awaited.
    """
    found, refused, subscribed, answered = [], [], threading.Event(), threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(wire.RELEASE_SEQ_MARKER_TOPIC, qos=1)
        answered.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        refused.extend(code for code in reason_codes if code.is_failure)
        subscribed.set()

    client = make_client(config, process_client_id("marker"))
    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_message = lambda c, u, message: found.append(message.payload)
    target = client.user_data_get()
    try:
        client.connect(target["host"], target["port"], keepalive=30)
        client.loop_start()
        if not answered.wait(timeout) or not client.is_connected() or not subscribed.wait(timeout):
            raise BrokerUnavailable(f"could not read {wire.RELEASE_SEQ_MARKER_TOPIC} from the broker")
        if refused:
            raise BrokerUnavailable(f"the broker refused a subscription to {wire.RELEASE_SEQ_MARKER_TOPIC}: {refused}")
        deadline = time.monotonic() + grace
        while not found and time.monotonic() < deadline:
            time.sleep(0.02)
    except OSError as exc:
        raise BrokerUnavailable(f"could not read {wire.RELEASE_SEQ_MARKER_TOPIC}: {exc}") from None
    finally:
        client.disconnect()
        client.loop_stop()
    if not found or found[0] == b"":
        return None
    try:
        return wire.decode(wire.ReleaseSeqMarker, found[0]).seq
    except wire.WireError as exc:
        log.error("ignoring a malformed release seq marker (taken as missing): %s", exc)
        return None


class BrokerUnavailable(Exception):
    """The broker could not be asked (down, or refused the connection or subscription)."""


def seq_floor_now() -> int:
    """The current time in milliseconds: where a restored database's sequence moves to at least.

    Above every seq issued before, unless the server issued more than one per millisecond on
    average since its sequence was last moved (a flush takes one; flushes are far rarer).
    """
    return int(time.time() * 1000)


def flush_after_commit():
    """Try to publish right away; whatever the broker does not take stays for the worker's sweep."""
    publisher = publisher_for(current_app)
    if not publisher.ready():
        return  # do not hold the lock waiting for a broker that is away; the sweep publishes later
    try:
        flush(lambda messages: publisher.publish_many(messages, retain=True))
    except Exception:  # the request already succeeded; the sweep retries
        log.exception("outbox flush failed; the worker will retry")
        db.session.rollback()
