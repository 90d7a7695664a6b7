"""provisioning tokens and device hardware ids

Revision ID: i8_security
Revises: d492b1f4c932
"""
from alembic import op
import sqlalchemy as sa


revision = "i8_security"
down_revision = "d492b1f4c932"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "provisioning_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.Column("device_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_provisioning_token_device_id_device"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provisioning_token")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_provisioning_token_token_hash")),
    )
    op.create_table(
        "device_hardware",
        sa.Column("hardware_id", sa.String(length=200), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_device_hardware_device_id_device"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("hardware_id", name=op.f("pk_device_hardware")),
    )
    with op.batch_alter_table("device_hardware", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_hardware_device_id"), ["device_id"], unique=False)


def downgrade():
    with op.batch_alter_table("device_hardware", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_hardware_device_id"))
    op.drop_table("device_hardware")
    op.drop_table("provisioning_token")
