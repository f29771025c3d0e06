"""The dashboard's tables: operators, their sessions, and the indexes its list needs.

They live on `pipeline.db.Base`, so Alembic sees them (migration 0002). The extra
indexes on `requests`, `store_tasks` and `transitions` keep the filtered, paginated
request list and the overview fast with a hundred thousand requests in the state database
(`bench/dashboard_scale.py`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.db import Base, RequestRow, StoreTaskRow, TransitionRow, UTCDateTime, utcnow


class OperatorRow(Base):
    """A member of staff who signs in to the dashboard; the role decides what they see."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | officer | admin
    password_hash: Mapped[str] = mapped_column(String(255))  # scrypt$n$r$p$salt$hash
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OperatorSessionRow(Base):
    """A signed-in browser. The cookie holds a random token; only its SHA-256 is stored,
    so a copy of the database signs nobody in."""

    __tablename__ = "operator_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


# The request list filters by type and jurisdiction and pages by (due_at, id); the store
# filter, the per-store counts and each store's last success read store_tasks by
# (store, status, completed_at). Connector health reads, store by store, the tasks touched
# in the last day from (store, updated_at, status, attempts, duration_ms) alone, and those
# with an error from a partial index of them; the charts read the day's final and
# stopping transitions by (to_state, at), the stage durations the last hour's by (at);
# the at-risk and overdue counts the open requests by (completed_at, due_at); the counts
# by type and state (overview, /metrics) read (type, state) alone.
Index("ix_requests_type", RequestRow.type, RequestRow.state)
Index("ix_requests_jurisdiction", RequestRow.jurisdiction)
Index("ix_requests_due_at_id", RequestRow.due_at, RequestRow.id)
Index("ix_requests_open_due", RequestRow.completed_at, RequestRow.due_at)
Index(
    "ix_store_tasks_store_status_completed",
    StoreTaskRow.store,
    StoreTaskRow.status,
    StoreTaskRow.completed_at,
)
Index(
    "ix_store_tasks_store_updated",
    StoreTaskRow.store,
    StoreTaskRow.updated_at,
    StoreTaskRow.status,
    StoreTaskRow.attempts,
    StoreTaskRow.duration_ms,
)
Index(
    "ix_store_tasks_errors",
    StoreTaskRow.store,
    StoreTaskRow.updated_at,
    sqlite_where=StoreTaskRow.last_error.is_not(None),
    postgresql_where=StoreTaskRow.last_error.is_not(None),
)
Index("ix_transitions_at", TransitionRow.at)
Index("ix_transitions_to_state_at", TransitionRow.to_state, TransitionRow.at)
