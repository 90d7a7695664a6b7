"""The command table: one row per command sent to a device, with its state and result."""
from datetime import datetime

from sqlalchemy import JSON, ForeignKey
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..extensions import db
from ..models import Device, UTCDateTime, new_uuid, utcnow


class Command(db.Model):
    """A command for one device, from the POST that created it to the result the device reported.

    `published_at` is when the broker first took the message (null: still in the server's hands).
    `next_attempt_at` is when the worker's sweep (re)publishes it if no final result came by
    then: an unfinished command is asked for again with a growing interval, because a result
    the broker acknowledged can still be lost (a broker restart drops shared subscriptions
    until a worker reconnects); the device answers a repeat from the results it keeps and never
    runs a command twice. `device_reported_at` is the device's clock of its latest report
    (null: the device never said anything about it, so a server-side `expired` may still be
    overturned by a late report).
    """

    id: Mapped[str] = mapped_column(db.String(36), primary_key=True, default=new_uuid)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"), index=True)
    command: Mapped[str] = mapped_column(db.String(200))
    arg: Mapped[list] = mapped_column(JSON, default=list)
    kwarg: Mapped[dict] = mapped_column(JSON, default=dict)
    timeout: Mapped[float | None] = mapped_column(db.Float)
    ttl: Mapped[int] = mapped_column()
    state: Mapped[str] = mapped_column(db.String(20), default="queued", index=True)
    return_value: Mapped[object | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(db.Text)
    truncated: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    device_reported_at: Mapped[float | None] = mapped_column(db.Float)

    device: Mapped[Device] = relationship()
