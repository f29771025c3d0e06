"""The dashboard's tables: operators, their sessions, and the indexes its list needs.

They live on `pipeline.db.Base`, so Alembic sees them (migration 0002). The extra
indexes on `requests` and `store_tasks` keep the filtered, paginated request list fast
with a hundred thousand requests in the state database.
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
# (store, status, completed_at); connector health reads the tasks touched in the last
# day (updated_at) and the charts the transitions of the last day (at).
Index("ix_requests_type", RequestRow.type)
Index("ix_requests_jurisdiction", RequestRow.jurisdiction)
Index("ix_requests_due_at_id", RequestRow.due_at, RequestRow.id)
Index(
    "ix_store_tasks_store_status_completed",
    StoreTaskRow.store,
    StoreTaskRow.status,
    StoreTaskRow.completed_at,
)
Index("ix_store_tasks_updated_at", StoreTaskRow.updated_at)
Index("ix_transitions_at", TransitionRow.at)
