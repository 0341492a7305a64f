"""pipeline runs, step runs, snapshots

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64)),
        sa.Column("experiment_id", sa.String(64)),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "step_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pipeline_run_id", sa.String(32), sa.ForeignKey("pipeline_runs.id"),
                  nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cache_key", sa.String(64), nullable=False),
        sa.Column("cache_hit", sa.Boolean, nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("outputs", sa.JSON, nullable=False),
        sa.Column("mlflow_run_id", sa.String(64)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("duration_s", sa.Float),
        sa.Column("peak_memory_mb", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("traceback", sa.Text),
    )
    op.create_index("ix_step_runs_cache", "step_runs", ["step", "cache_key", "status"])
    op.create_index("ix_step_runs_run", "step_runs", ["pipeline_run_id"])
    op.create_table(
        "snapshots",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("columns", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("snapshots")
    op.drop_index("ix_step_runs_run", "step_runs")
    op.drop_index("ix_step_runs_cache", "step_runs")
    op.drop_table("step_runs")
    op.drop_table("pipeline_runs")
