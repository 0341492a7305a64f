"""monitoring: one row per evaluated window of the inference log

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitor_windows",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("spec", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("reference_version", sa.Integer, nullable=True),
        sa.Column("drifted", sa.Boolean, nullable=True),
        sa.Column("drift_share", sa.Float, nullable=True),
        sa.Column("prediction_drifted", sa.Boolean, nullable=True),
        sa.Column("quality_findings", sa.Integer, nullable=False),
        sa.Column("metric", sa.String(50), nullable=True),
        sa.Column("metric_value", sa.Float, nullable=True),
        sa.Column("reference_metric", sa.Float, nullable=True),
        sa.Column("labelled_rows", sa.Integer, nullable=False),
        sa.Column("label_coverage", sa.Float, nullable=False),
        sa.Column("report", sa.JSON, nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("performance_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("model", "spec", "seq", name="uq_monitor_windows_seq"),
    )
    op.create_index("ix_monitor_windows_model_end", "monitor_windows", ["model", "spec", "end"])


def downgrade() -> None:
    op.drop_index("ix_monitor_windows_model_end", "monitor_windows")
    op.drop_table("monitor_windows")
