"""PostgreSQL: the series index carries the rendered entry, for index-only raw reads

Revision ID: i7_series_covering
Revises: m2_merge
"""
from alembic import op

revision = "i7_series_covering"
down_revision = "m2_merge"
branch_labels = None
depends_on = None

_COLUMNS = ["device_id", "field", "field_type", "ts_us"]


def upgrade():
    # SQLite has no INCLUDE, and its raw read already walks the index in order.
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_telemetry_reading_series", table_name="telemetry_reading")
    op.create_index("ix_telemetry_reading_series", "telemetry_reading", _COLUMNS, postgresql_include=["entry_json"])


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_telemetry_reading_series", table_name="telemetry_reading")
    op.create_index("ix_telemetry_reading_series", "telemetry_reading", _COLUMNS)
