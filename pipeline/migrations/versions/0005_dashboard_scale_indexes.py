"""the dashboard's reads at 100,000 requests: indexes that lead with what they filter on

Measured with `bench/dashboard_scale.py`. Connector health now counts in SQL, store by
store: (store, updated_at, status, attempts, duration_ms) holds every column it reads of
the tasks touched in the last day, so it replaces (updated_at), and a partial index of
the tasks with an error gives the last error and the errors of pending tasks. The charts
read the day's final and stopping transitions by (to_state, at), the at-risk and overdue
counts the open requests by (completed_at, due_at), and the counts by type and state
(overview, /metrics) read (type, state) alone: `ix_requests_type` gains `state` (the type
filter still leads with type; a separate (state, type) index would take the state filter
over from `ix_requests_state` on SQLite, which plans without statistics, and make it
slower).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 18:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

HAS_ERROR = sa.text("last_error IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_store_tasks_updated_at", table_name="store_tasks")
    op.create_index(
        "ix_store_tasks_store_updated",
        "store_tasks",
        ["store", "updated_at", "status", "attempts", "duration_ms"],
    )
    op.create_index(
        "ix_store_tasks_errors",
        "store_tasks",
        ["store", "updated_at"],
        sqlite_where=HAS_ERROR,
        postgresql_where=HAS_ERROR,
    )
    op.create_index("ix_transitions_to_state_at", "transitions", ["to_state", "at"])
    op.create_index("ix_requests_open_due", "requests", ["completed_at", "due_at"])
    op.drop_index("ix_requests_type", table_name="requests")
    op.create_index("ix_requests_type", "requests", ["type", "state"])


def downgrade() -> None:
    op.drop_index("ix_requests_type", table_name="requests")
    op.create_index("ix_requests_type", "requests", ["type"])
    op.drop_index("ix_requests_open_due", table_name="requests")
    op.drop_index("ix_transitions_to_state_at", table_name="transitions")
    op.drop_index("ix_store_tasks_errors", table_name="store_tasks")
    op.drop_index("ix_store_tasks_store_updated", table_name="store_tasks")
    op.create_index("ix_store_tasks_updated_at", "store_tasks", ["updated_at"])
