"""the series index covers the reads: value and the rendered entry in it

A fleet's readings arrive side by side, so one device's day lies scattered over the whole
table: read through the old index, a raw read of 8,640 entries visited thousands of table
pages. With `value` and `entry_json` in the index, raw and aggregated reads are answered by
one contiguous range of the index alone. On PostgreSQL that needs the visibility map kept
up, so the table is vacuumed after every 100,000 inserts rather than after a fifth of its
size has been added.

Revision ID: i7_series_covering
Revises: m2_merge
"""
from alembic import op

revision = "i7_series_covering"
down_revision = "m2_merge"
branch_labels = None
depends_on = None

_SERIES = ["device_id", "field", "field_type", "ts_us"]


def upgrade():
    with op.batch_alter_table("telemetry_reading", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_reading_series")
        batch_op.create_index("ix_telemetry_reading_series", [*_SERIES, "value", "entry_json"], unique=False)
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry_reading SET (autovacuum_vacuum_insert_scale_factor = 0,"
                   " autovacuum_vacuum_insert_threshold = 100000)")


def downgrade():
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry_reading RESET (autovacuum_vacuum_insert_scale_factor,"
                   " autovacuum_vacuum_insert_threshold)")
    with op.batch_alter_table("telemetry_reading", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_reading_series")
        batch_op.create_index("ix_telemetry_reading_series", _SERIES, unique=False)
