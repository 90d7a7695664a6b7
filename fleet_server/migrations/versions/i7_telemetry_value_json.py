"""telemetry readings keep their value as JSON text, for reads built in the database

Revision ID: i7_telemetry_value_json
Revises: m1_merge
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "i7_telemetry_value_json"
down_revision = "m1_merge"
branch_labels = None
depends_on = None

_CHUNK = 10_000


def _value_json(field_type, value, lat, lon) -> str:
    # As fleet_server.logbook.service writes it at ingest (copied: a migration must not change
    # when that code does).
    if field_type == "geo_point":
        return json.dumps({"lat": lat, "lon": lon}, separators=(",", ":"))
    return json.dumps(value)


def upgrade():
    with op.batch_alter_table("telemetry_reading") as batch_op:
        batch_op.add_column(sa.Column("value_json", sa.Text(), nullable=True))
    # Readings stored before this revision get theirs from the stored doubles, a chunk at a time.
    connection = op.get_bind()
    reading = sa.table("telemetry_reading", sa.column("id"), sa.column("field_type"), sa.column("value"),
                       sa.column("lat"), sa.column("lon"), sa.column("value_json"))
    update = reading.update().where(reading.c.id == sa.bindparam("row_id")).values(value_json=sa.bindparam("text"))
    last = None
    while True:
        query = sa.select(reading.c.id, reading.c.field_type, reading.c.value, reading.c.lat, reading.c.lon).where(
            reading.c.value_json.is_(None)).order_by(reading.c.id).limit(_CHUNK)
        if last is not None:
            query = query.where(reading.c.id > last)
        rows = connection.execute(query).all()
        if not rows:
            break
        connection.execute(update, [{"row_id": row.id, "text": _value_json(row.field_type, row.value, row.lat, row.lon)}
                                    for row in rows])
        last = rows[-1].id


def downgrade():
    with op.batch_alter_table("telemetry_reading") as batch_op:
        batch_op.drop_column("value_json")
