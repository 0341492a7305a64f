"""the audit chain's head (length and newest hash), so truncation is detected

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("events", sa.Integer, nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_head")
