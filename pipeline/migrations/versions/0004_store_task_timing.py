"""store_tasks: how long the last store call took; indexes for the dashboard's windows

`duration_ms` is the time the connector took on the task's last attempt (success or
error), so the dashboard can show each store's latency. The new indexes serve the
reads the dashboard makes on a large state database: the last success per store
(store, status, completed_at), the tasks touched in the last day (updated_at) and the
transitions of the last day (at).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("store_tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("duration_ms", sa.Integer(), nullable=True))
    op.drop_index("ix_store_tasks_store_status", table_name="store_tasks")
    op.create_index(
        "ix_store_tasks_store_status_completed",
        "store_tasks",
        ["store", "status", "completed_at"],
    )
    op.create_index("ix_store_tasks_updated_at", "store_tasks", ["updated_at"])
    op.create_index("ix_transitions_at", "transitions", ["at"])


def downgrade() -> None:
    op.drop_index("ix_transitions_at", table_name="transitions")
    op.drop_index("ix_store_tasks_updated_at", table_name="store_tasks")
    op.drop_index("ix_store_tasks_store_status_completed", table_name="store_tasks")
    op.create_index("ix_store_tasks_store_status", "store_tasks", ["store", "status"])
    with op.batch_alter_table("store_tasks", schema=None) as batch_op:
        batch_op.drop_column("duration_ms")
