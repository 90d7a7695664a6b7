"""dead letters: device reports the worker could not store

Revision ID: h1_dead_letters
Revises: i7_series_covering
"""
import sqlalchemy as sa
from alembic import op

revision = "h1_dead_letters"
down_revision = "i7_series_covering"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "dead_letter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("topic", sa.String(length=300), nullable=False),
        sa.Column("unit_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=20), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter")),
    )
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dead_letter_unit_id"), ["unit_id"], unique=False)


def downgrade():
    with op.batch_alter_table("dead_letter", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letter_unit_id"))
    op.drop_table("dead_letter")
