"""telemetry readings keep the entry a raw read returns, rendered at ingest

Revision ID: i7_telemetry_entry_json
Revises: m1_merge
"""
import json
from datetime import datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "i7_telemetry_entry_json"
down_revision = "m1_merge"
branch_labels = None
depends_on = None

_CHUNK = 10_000


def _entry_json(ts_us, field_type, value, lat, lon) -> str:
    # What fleet_server.logbook.service renders at ingest and raw reads returned before this
    # revision (copied here: a migration must not change when that code does).
    ts = (datetime(1970, 1, 1) + timedelta(microseconds=ts_us)).isoformat(timespec="microseconds") + "Z"
    if field_type == "geo_point":
        return json.dumps({"ts": ts, "location": {"lat": lat, "lon": lon}}, separators=(",", ":"))
    return json.dumps({"ts": ts, "value": value}, separators=(",", ":"))


def upgrade():
    with op.batch_alter_table("telemetry_reading") as batch_op:
        batch_op.add_column(sa.Column("entry_json", sa.Text(), nullable=True))
    render_missing_entries(op.get_bind())


def render_missing_entries(connection):
    """Render the entries of readings stored before this revision from their columns, a chunk at a time."""
    reading = sa.table("telemetry_reading", sa.column("id"), sa.column("ts_us"), sa.column("field_type"),
                       sa.column("value"), sa.column("lat"), sa.column("lon"), sa.column("entry_json"))
    update = reading.update().where(reading.c.id == sa.bindparam("row_id")).values(entry_json=sa.bindparam("entry"))
    last = None
    while True:
        query = (sa.select(reading.c.id, reading.c.ts_us, reading.c.field_type, reading.c.value, reading.c.lat,
                           reading.c.lon)
                 .where(reading.c.entry_json.is_(None)).order_by(reading.c.id).limit(_CHUNK))
        if last is not None:
            query = query.where(reading.c.id > last)
        rows = connection.execute(query).all()
        if not rows:
            break
        connection.execute(update, [{"row_id": row.id, "entry": _entry_json(*row[1:])} for row in rows])
        last = rows[-1].id


def downgrade():
    with op.batch_alter_table("telemetry_reading") as batch_op:
        batch_op.drop_column("entry_json")
