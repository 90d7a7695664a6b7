"""Ingest workers' broker sessions: who holds each one, and handing a dead worker's session to a live one.

Each worker keeps a persistent MQTT session (client id `fleet-worker-<worker id>`) in the
shared-subscription group. Mosquitto goes on routing the group's messages, round robin,
to a member whose client is gone: they wait in its session until that client id connects
again. So a worker that dies for good would take its share of every later report with
it. Each worker therefore heartbeats its row here; a row whose heartbeat is older than
FLEET_WORKER_ADOPT_AFTER is claimed by a live worker, which resumes that session, stops
it receiving new messages, stores what was waiting in it, and ends it.
"""
import time

from sqlalchemy.orm import Mapped, mapped_column

from ..extensions import db


class IngestSession(db.Model):
    """One ingest worker's broker session and the last sign of life of its holder."""

    client_id: Mapped[str] = mapped_column(db.String(200), primary_key=True)
    worker_id: Mapped[str] = mapped_column(db.String(200))
    heartbeat_at: Mapped[float] = mapped_column(db.Float)
    adopted_by: Mapped[str | None] = mapped_column(db.String(200))
    adopted_at: Mapped[float | None] = mapped_column(db.Float)


def heartbeat(client_id: str, worker_id: str, now: float | None = None):
    """Record that the worker holding this session is alive (creating its row if needed)."""
    now = time.time() if now is None else now
    updated = db.session.execute(
        db.update(IngestSession)
        .where(IngestSession.client_id == client_id)
        .values(heartbeat_at=now, worker_id=worker_id, adopted_by=None, adopted_at=None)
    ).rowcount
    if not updated:
        db.session.add(IngestSession(client_id=client_id, worker_id=worker_id, heartbeat_at=now))
    db.session.commit()


def claim_orphans(adopter: str, stale_after: float, now: float | None = None) -> list[str]:
    """Claim every session whose holder went silent; returns the client ids this worker now drains.

    The conditional UPDATE is the arbiter: of several workers racing for a session, one changes the row.
    """
    now = time.time() if now is None else now
    cutoff = now - stale_after
    stale = db.session.scalars(
        db.select(IngestSession.client_id).where(
            IngestSession.heartbeat_at < cutoff,
            db.or_(IngestSession.adopted_at.is_(None), IngestSession.adopted_at < cutoff),
        )
    ).all()
    claimed = []
    for client_id in stale:
        won = db.session.execute(
            db.update(IngestSession)
            .where(
                IngestSession.client_id == client_id,
                IngestSession.heartbeat_at < cutoff,
                db.or_(IngestSession.adopted_at.is_(None), IngestSession.adopted_at < cutoff),
            )
            .values(adopted_by=adopter, adopted_at=now)
        ).rowcount
        db.session.commit()
        if won:
            claimed.append(client_id)
    return claimed


def keep_claim(client_id: str, adopter: str):
    """Refresh a claim while draining, so no third worker takes the session over meanwhile."""
    db.session.execute(
        db.update(IngestSession)
        .where(IngestSession.client_id == client_id, IngestSession.adopted_by == adopter)
        .values(adopted_at=time.time())
    )
    db.session.commit()


def finish_claim(client_id: str, adopter: str, drained: bool):
    """Forget a drained session; or give the claim up so the session can be claimed again."""
    owned = db.and_(IngestSession.client_id == client_id, IngestSession.adopted_by == adopter)
    if drained:
        db.session.execute(db.delete(IngestSession).where(owned))
    else:
        db.session.execute(db.update(IngestSession).where(owned).values(adopted_by=None, adopted_at=None))
    db.session.commit()
