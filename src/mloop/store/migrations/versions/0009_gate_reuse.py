"""gate runs remember the gate config they ran under, and each result its message, so a
promotion can reuse a report computed against the same champion under the same config

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gate_runs") as batch:
        batch.add_column(sa.Column("gates_hash", sa.String(64), nullable=True))
    with op.batch_alter_table("gate_results") as batch:
        batch.add_column(sa.Column("message", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gate_results") as batch:
        batch.drop_column("message")
    with op.batch_alter_table("gate_runs") as batch:
        batch.drop_column("gates_hash")
