"""one head again: the telemetry entry column and the device list index

Revision ID: m2_merge
Revises: i7_telemetry_entry_json, r9_device_list_order
Create Date: 2026-11-26 02:30:00.000000

"""

# revision identifiers, used by Alembic.
revision = 'm2_merge'
down_revision = ('i7_telemetry_entry_json', 'r9_device_list_order')
branch_labels = None
depends_on = None


def upgrade():
    pass


def downgrade():
    pass
