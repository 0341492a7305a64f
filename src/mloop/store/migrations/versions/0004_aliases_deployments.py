"""aliases as mloop set them (optimistic revision) and the deployment history

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aliases",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("alias", sa.String(50), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("alias", sa.String(50), nullable=False),
        sa.Column("traffic", sa.Float, nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_deployments_model_alias", "deployments", ["model", "alias", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_deployments_model_alias", "deployments")
    op.drop_table("deployments")
    op.drop_table("aliases")
