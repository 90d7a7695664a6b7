"""telemetry readings and batches

Revision ID: i7_telemetry
Revises: d492b1f4c932
"""
import sqlalchemy as sa
from alembic import op

revision = "i7_telemetry"
down_revision = "d492b1f4c932"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade():
    op.create_table(
        "telemetry_reading",
        sa.Column("id", BigId, nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("field", sa.String(length=200), nullable=False),
        sa.Column("field_type", sa.String(length=20), nullable=False),
        sa.Column("ts_us", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("lat", sa.Float(), nullable=True),
        sa.Column("lon", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_telemetry_reading_device_id_device"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_reading")),
    )
    with op.batch_alter_table("telemetry_reading") as batch_op:
        batch_op.create_index("ix_telemetry_reading_series", ["device_id", "field", "field_type", "ts_us"])
    op.create_table(
        "telemetry_batch",
        sa.Column("id", BigId, nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("batch_id", sa.String(length=32), nullable=False),
        sa.Column("readings", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_telemetry_batch_device_id_device"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_batch")),
        sa.UniqueConstraint("device_id", "batch_id", name=op.f("uq_telemetry_batch_device_id")),
    )


def downgrade():
    op.drop_table("telemetry_batch")
    with op.batch_alter_table("telemetry_reading") as batch_op:
        batch_op.drop_index("ix_telemetry_reading_series")
    op.drop_table("telemetry_reading")
