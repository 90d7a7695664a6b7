"""remote commands

Revision ID: i6_commands
Revises: d492b1f4c932
"""
from alembic import op
import sqlalchemy as sa


revision = "i6_commands"
down_revision = "d492b1f4c932"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "command",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("device_id", sa.String(length=36), nullable=False),
        sa.Column("command", sa.String(length=200), nullable=False),
        sa.Column("arg", sa.JSON(), nullable=False),
        sa.Column("kwarg", sa.JSON(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=True),
        sa.Column("ttl", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("return_value", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("published_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.Column("device_reported_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"], name=op.f("fk_command_device_id_device"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_command")),
    )
    with op.batch_alter_table("command", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_command_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_command_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_command_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_command_next_attempt_at"), ["next_attempt_at"], unique=False)


def downgrade():
    with op.batch_alter_table("command", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_command_next_attempt_at"))
        batch_op.drop_index(batch_op.f("ix_command_created_at"))
        batch_op.drop_index(batch_op.f("ix_command_state"))
        batch_op.drop_index(batch_op.f("ix_command_device_id"))
    op.drop_table("command")
