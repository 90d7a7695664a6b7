"""Telemetry tables: one row per reading, one row per batch a device sent."""
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..extensions import db
from ..models import UTCDateTime, utcnow

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL needs 64 bits for a long-lived table.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class TelemetryReading(db.Model):
    """One reading. `ts_us` is epoch microseconds (UTC): integer arithmetic buckets it the same on every database."""

    __tablename__ = "telemetry_reading"
    # The read path filters on device, field and type and scans a time range: this index serves
    # it as one contiguous range, whatever else is stored. It also holds what reads return
    # (value, entry_json), so a read never visits the table, where a fleet's readings of one
    # moment lie side by side and one device's day is scattered over thousands of pages.
    __table_args__ = (
        Index("ix_telemetry_reading_series", "device_id", "field", "field_type", "ts_us", "value", "entry_json"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    field: Mapped[str] = mapped_column(db.String(200))
    field_type: Mapped[str] = mapped_column(db.String(20))
    ts_us: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(db.Float)
    lat: Mapped[float | None] = mapped_column(db.Float)
    lon: Mapped[float | None] = mapped_column(db.Float)
    # The reading as a raw read returns it, rendered once at ingest:
    # `{"ts":"2020-07-09T10:11:53.811839Z","value":13.25}` or `{"ts":...,"location":{"lat":..,"lon":..}}`.
    # A raw read only joins these. Formatting thousands of timestamps and doubles per read costs
    # more than the query on both databases, and SQLite cannot print a double exactly (15 digits,
    # or 17 that are not always correctly rounded).
    entry_json: Mapped[str | None] = mapped_column(db.Text)


class TelemetryBatch(db.Model):
    """A batch a device sent: its id makes a redelivered batch a no-op."""

    __tablename__ = "telemetry_batch"
    __table_args__ = (UniqueConstraint("device_id", "batch_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    batch_id: Mapped[str] = mapped_column(db.String(32))
    readings: Mapped[int] = mapped_column()
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
