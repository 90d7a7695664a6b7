"""ingest workers' broker sessions

Revision ID: i9_ingest_sessions
Revises: d492b1f4c932
"""
import sqlalchemy as sa
from alembic import op

revision = "i9_ingest_sessions"
down_revision = "d492b1f4c932"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "ingest_session",
        sa.Column("client_id", sa.String(length=200), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("adopted_by", sa.String(length=200), nullable=True),
        sa.Column("adopted_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_ingest_session")),
    )


def downgrade():
    op.drop_table("ingest_session")
