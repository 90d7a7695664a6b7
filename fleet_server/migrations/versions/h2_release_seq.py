"""release documents carry a seq from one sequence; the topics ever published are remembered

`release_seq_state` holds, in one row, the counter SQLite issues from and the highest seq the
broker acknowledged; PostgreSQL issues from the `release_seq` SEQUENCE, which no rollback takes
back. `release_topic` lists every (device, project) release topic published, so that a broker
that lost its retained messages can be given all of them again. The topics published before
this revision are those the outbox can compute: every device of every release.

Revision ID: h2_release_seq
Revises: i7_series_covering
"""
import sqlalchemy as sa
from alembic import op

revision = "h2_release_seq"
down_revision = "i7_series_covering"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "release_seq_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("issued", sa.BigInteger(), nullable=False),
        sa.Column("published", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_seq_state")),
    )
    op.execute("INSERT INTO release_seq_state (id, issued, published) VALUES (1, 0, 0)")
    op.create_table(
        "release_topic",
        sa.Column("unit_id", sa.String(length=36), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("unit_id", "project_id", name=op.f("pk_release_topic")),
    )
    op.execute(
        "INSERT INTO release_topic (unit_id, project_id)"
        " SELECT DISTINCT device.unit_id, release.project_id FROM release_device"
        " JOIN device ON device.id = release_device.device_id JOIN release ON release.id = release_device.release_id"
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE release_seq AS bigint START WITH 1")


def downgrade():
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE release_seq")
    op.drop_table("release_topic")
    op.drop_table("release_seq_state")
