"""monitor windows indexed by evaluation time (with the window end) and by start: the
dashboard places a wall-clock instant on the event clock with the newest window evaluated
before it (ORDER BY evaluated_at LIMIT 1, max(end) over an index range) and reads the newest
window by start, instead of loading every window (10,000 of them took the Overview ~0.8 s)

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_monitor_windows_model_evaluated", "monitor_windows",
                    ["model", "spec", "evaluated_at", "end"])
    op.create_index("ix_monitor_windows_model_start", "monitor_windows",
                    ["model", "spec", "start"])


def downgrade() -> None:
    op.drop_index("ix_monitor_windows_model_start", table_name="monitor_windows")
    op.drop_index("ix_monitor_windows_model_evaluated", table_name="monitor_windows")
