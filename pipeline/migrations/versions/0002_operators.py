"""operators, their sessions, and the indexes the dashboard's request list needs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import pipeline.db

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", pipeline.db.UTCDateTime(), nullable=False),
        sa.Column("disabled_at", pipeline.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "operator_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("operator_id", sa.Integer(), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", pipeline.db.UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", pipeline.db.UTCDateTime(), nullable=False),
        sa.Column("expires_at", pipeline.db.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["operator_id"], ["operators.id"]),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    op.create_index("ix_operator_sessions_expires_at", "operator_sessions", ["expires_at"])
    op.create_index("ix_operator_sessions_operator_id", "operator_sessions", ["operator_id"])
    op.create_index("ix_requests_type", "requests", ["type"])
    op.create_index("ix_requests_jurisdiction", "requests", ["jurisdiction"])
    op.create_index("ix_requests_due_at_id", "requests", ["due_at", "id"])
    op.create_index("ix_store_tasks_store_status", "store_tasks", ["store", "status"])


def downgrade() -> None:
    op.drop_index("ix_store_tasks_store_status", table_name="store_tasks")
    op.drop_index("ix_requests_due_at_id", table_name="requests")
    op.drop_index("ix_requests_jurisdiction", table_name="requests")
    op.drop_index("ix_requests_type", table_name="requests")
    op.drop_index("ix_operator_sessions_operator_id", table_name="operator_sessions")
    op.drop_index("ix_operator_sessions_expires_at", table_name="operator_sessions")
    op.drop_table("operator_sessions")
    op.drop_table("operators")
