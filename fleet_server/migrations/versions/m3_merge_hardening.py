"""Merge the dead-letter and release-sequence heads into one.

Revision ID: m3_merge
Revises: h1_dead_letters, h2_release_seq
"""

revision = "m3_merge"
down_revision = ("h1_dead_letters", "h2_release_seq")
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
