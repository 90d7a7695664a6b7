"""Database models: projects, releases and their containers, devices, deployments, tokens."""
import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, ForeignKey, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

import fleet_wire as wire

from .extensions import db


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_uuid() -> str:
    return str(uuid.uuid4())


class UTCDateTime(db.TypeDecorator):
    """Timestamps stored naive in UTC and handed back timezone-aware, on every database."""

    impl = db.DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None else None


release_devices = db.Table(
    "release_device",
    db.Column("release_id", db.Integer, db.ForeignKey("release.id", ondelete="CASCADE"), primary_key=True),
    db.Column("device_id", db.String(36), db.ForeignKey("device.id", ondelete="CASCADE"), primary_key=True),
)


class Registry(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(db.String(200))
    url: Mapped[str] = mapped_column(db.String(500))
    username: Mapped[str] = mapped_column(db.String(200), default="")
    password_encrypted: Mapped[str] = mapped_column(db.Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Project(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(db.String(200))
    description: Mapped[str] = mapped_column(db.Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    releases: Mapped[list["Release"]] = relationship(
        back_populates="project", cascade="all, delete-orphan", order_by="Release.id"
    )


class Device(db.Model):
    # The device list's order (r9_device_list_order): pages without sorting the table.
    __table_args__ = (db.Index("ix_device_created_at_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(db.String(36), primary_key=True, default=new_uuid)
    unit_id: Mapped[str] = mapped_column(db.String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(db.String(200), default="")
    description: Mapped[str] = mapped_column(db.Text, default="")
    tags: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    online: Mapped[bool] = mapped_column(default=False)
    agent_version: Mapped[str | None] = mapped_column(db.String(50))

    deployments: Mapped[list["Deployment"]] = relationship(back_populates="device", cascade="all, delete-orphan")

    @property
    def docker_releases(self) -> list[int]:
        """Ids of the releases this device reports as successfully deployed and running."""
        return sorted(d.release_id for d in self.deployments if d.state == "succeeded")


class Release(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(db.String(100))
    version_hash: Mapped[str] = mapped_column(db.String(8), index=True)
    remove_containers: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    project: Mapped[Project] = relationship(back_populates="releases")
    containers: Mapped[list["ReleaseContainer"]] = relationship(
        back_populates="release", cascade="all, delete-orphan", order_by="ReleaseContainer.position"
    )
    devices: Mapped[list[Device]] = relationship(secondary=release_devices, order_by=Device.id)
    deployments: Mapped[list["Deployment"]] = relationship(back_populates="release", cascade="all, delete-orphan")

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    @property
    def successful_deployments(self) -> list[str]:
        return sorted(d.device_id for d in self.deployments if d.state == "succeeded")


class ReleaseContainer(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("release.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(default=0)
    name: Mapped[str] = mapped_column(db.String(128))
    image: Mapped[str] = mapped_column(db.String(255))
    tag: Mapped[str] = mapped_column(db.String(128))
    required_tags: Mapped[list] = mapped_column(JSON, default=list)
    startup_parameters: Mapped[dict] = mapped_column(JSON, default=dict)
    purge_data: Mapped[bool] = mapped_column(default=False)
    registry_id: Mapped[int | None] = mapped_column(ForeignKey("registry.id"))

    release: Mapped[Release] = relationship(back_populates="containers")

    @property
    def fully_qualified_name(self) -> str:
        return wire.fully_qualified_name(self.release.project_id, self.name)


class Deployment(db.Model):
    """The latest reported state of one release on one device."""

    __table_args__ = (UniqueConstraint("release_id", "device_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("release.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(db.String(20))
    step: Mapped[str | None] = mapped_column(db.String(50))
    detail: Mapped[str] = mapped_column(db.Text, default="")
    reported_at: Mapped[float] = mapped_column(db.Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    release: Mapped[Release] = relationship(back_populates="deployments")
    device: Mapped[Device] = relationship(back_populates="deployments")


class ApiToken(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(db.String(200))
    token_hash: Mapped[str] = mapped_column(db.String(64), unique=True)
    role: Mapped[str] = mapped_column(db.String(20), default="admin")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Publication(db.Model):
    """Outbox: a device's retained release topic of a project that must be (re)published.

    Written in the same transaction as the change that causes it, so a broker outage
    delays a publication but never loses it. The document is computed when the row is
    flushed, so a flush always sends the current state.
    """

    id: Mapped[int] = mapped_column(primary_key=True)
    unit_id: Mapped[str] = mapped_column(db.String(36), index=True)
    project_id: Mapped[int] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

class DeadLetter(db.Model):
    """A device report the worker could not store, kept for an admin to look at (deadletters package).

    The report was acknowledged all the same: left on the broker it would be delivered again and
    again, and enough of them would stop the worker's session from taking anything else.
    """

    id: Mapped[int] = mapped_column(primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    topic: Mapped[str] = mapped_column(db.String(300))
    unit_id: Mapped[str | None] = mapped_column(db.String(36), index=True)  # None when the topic names no device
    kind: Mapped[str | None] = mapped_column(db.String(20))
    reason: Mapped[str] = mapped_column(db.Text)
    payload: Mapped[bytes] = mapped_column(db.LargeBinary)  # its first bytes: see deadletters.service.PAYLOAD_KEPT
    payload_size: Mapped[int] = mapped_column()


class ReleaseSeqState(db.Model):
    """The release sequence's marks, in one row (id 1): what a release document's `seq` is taken from.

    `issued` is the counter itself on SQLite; PostgreSQL issues from the `release_seq` SEQUENCE,
    which no rollback takes back. `published` is the highest seq the broker acknowledged on a
    release topic: the broker's retained marker must reach it, or the broker lost state.
    """

    __tablename__ = "release_seq_state"

    id: Mapped[int] = mapped_column(primary_key=True)
    issued: Mapped[int] = mapped_column(db.BigInteger, default=0)
    published: Mapped[int] = mapped_column(db.BigInteger, default=0)


class ReleaseTopic(db.Model):
    """A device's release topic of one project that was ever published: what a broker that lost
    its retained messages must be given again (devices and projects deleted since included)."""

    unit_id: Mapped[str] = mapped_column(db.String(36), primary_key=True)
    project_id: Mapped[int] = mapped_column(primary_key=True)
