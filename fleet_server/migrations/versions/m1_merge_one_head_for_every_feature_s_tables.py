"""one head for every feature's tables

Revision ID: m1_merge
Revises: i6_commands, i7_telemetry, i8_security, i9_ingest_sessions
Create Date: 2026-11-25 23:27:07.047500

"""
from alembic import op
import sqlalchemy as sa
import fleet_server.models  # noqa: F401  (custom column types)


# revision identifiers, used by Alembic.
revision = 'm1_merge'
down_revision = ('i6_commands', 'i7_telemetry', 'i8_security', 'i9_ingest_sessions')
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
