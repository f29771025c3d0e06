"""The state database: the source of truth for every request (DESIGN invariant 1).

Every request, transition, store task, outbound message, notification, export, case,
suppression and audit event is a row here. Columns holding personal data are
`LargeBinary` ciphertexts from the key ring; look-ups go through blind-index columns.
The schema is created and changed by Alembic migrations (`pipeline/migrations`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: the same on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use timezone-aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class RequestRow(Base):
    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    jurisdiction: Mapped[str] = mapped_column(String(8))
    channel: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(32), index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)  # plain words, never PII
    subject_hash: Mapped[str] = mapped_column(String(64), index=True)
    subject_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    payload_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    content_hash: Mapped[str] = mapped_column(String(64))
    schema_version: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    original_due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    extension_reason: Mapped[str | None] = mapped_column(Text)
    verified_by: Mapped[str | None] = mapped_column(String(64))
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    linked_to: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # counts only, no PII
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TransitionRow(Base):
    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StoreTaskRow(Base):
    __tablename__ = "store_tasks"
    __table_args__ = (UniqueConstraint("request_id", "store", "phase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    store: Mapped[str] = mapped_column(String(64))
    phase: Mapped[str] = mapped_column(String(16))  # locate | act | recheck
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # counts and flags only
    detail_enc: Mapped[bytes | None] = mapped_column(LargeBinary)  # anything with PII
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_ms: Mapped[int | None] = mapped_column(Integer)  # the last attempt's store call


class OutboxRow(Base):
    """A message to publish, written in the same commit as the state that wants it."""

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    actor: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    args: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)


class NotificationRow(Base):
    """One email per event: the unique (request, event) key is the guarantee (invariant 4)."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("request_id", "event"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(64))
    recipient_enc: Mapped[bytes] = mapped_column(LargeBinary)
    context_enc: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|sending|sent
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last attempt or nudge
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a sender's lease
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class VerificationRow(Base):
    __tablename__ = "verifications"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExportRow(Base):
    __tablename__ = "exports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), unique=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    downloads: Mapped[int] = mapped_column(Integer, default=0)


class CaseRow(Base):
    """A concern for the privacy team (R27)."""

    __tablename__ = "cases"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="open")
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    message_enc: Mapped[bytes] = mapped_column(LargeBinary)
    reply_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SuppressionRow(Base):
    """The minimal keyed hash needed to honour an opt-out or erasure (R25, R26)."""

    __tablename__ = "suppressions"

    email_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RejectionRow(Base):
    """An intake document that broke the contract: why, never what it said (R6)."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    request_id: Mapped[str | None] = mapped_column(String(128))
    code: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text)
    document_hash: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)


class AuditRow(Base):
    """Append-only, hash-chained log of every action on personal data (R28)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


Index("ix_store_tasks_status", StoreTaskRow.status, StoreTaskRow.phase)
Index("ix_notifications_status", NotificationRow.status)


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    """An engine tuned per backend: SQLite takes write locks up front and waits for them."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event drive BEGIN
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(conn: Any) -> None:
            # Serialise writers from the start of the transaction: a read-then-write
            # (the audit chain head, a fan-in check) must not act on a stale snapshot.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # pool_pre_ping: a server that restarted has cut every pooled connection; each
    # checkout tests its connection first and opens a new one in place of a dead one.
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    if engine.dialect.name == "postgresql":
        _wait_for_a_restarting_server(engine)
    return engine


SERVER_PATIENCE_S = 10.0  # how long a new connection waits for a restarting server
# What libpq says when no server answers, or one is starting or stopping. Anything else
# (authentication, a missing database, too many clients) fails at once.
SERVER_AWAY = (
    "connection refused",
    "server closed the connection unexpectedly",
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "the database system is shutting down",
    "the database system is in recovery mode",
)


def _wait_for_a_restarting_server(engine: Engine, patience: float = SERVER_PATIENCE_S) -> None:
    """A new connection waits (up to `patience` seconds) for a server that refuses
    connections or is starting up, instead of failing at once.

    A PostgreSQL restart takes a second or two. Without this, every unit of work that
    begins in that moment fails. Most are retried by dramatiq, but not the one that
    records an email as sent after the mail server accepted it: its failure leaves the
    sender's lease to expire and the email goes out twice. A transaction already running
    when the server went away fails as before: dramatiq retries its message, and
    idempotent stages make that safe.
    """

    @event.listens_for(engine, "do_connect")
    def _connect_patiently(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + patience
        pause = 0.1
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                away = any(words in str(exc).lower() for words in SERVER_AWAY)
                if not away or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


_Row = TypeVar("_Row")


def free_rows(session: Session, query: Select[_Row]) -> list[_Row]:
    """What `query` finds that no other transaction holds, locked for this one, never
    waiting for a lock (PostgreSQL's SKIP LOCKED; SQLite runs one writer at a time).
    For stages that take on work waiting for them."""
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.execute(query).scalars())


# -- rows written at the commit ----------------------------------------------------------

_AT_COMMIT = "at_commit"  # session.info: kind -> what this transaction writes at its commit


def add_at_commit(session: Session, kind: str, item: Any) -> None:
    """Something the transaction writes when it commits (its `before_commit` writer pops
    it with `take_at_commit`), dropped if it rolls back: history nothing reads back
    before the commit (audit entries, transitions)."""
    session.info.setdefault(_AT_COMMIT, {}).setdefault(kind, []).append(item)


def take_at_commit(session: Session, kind: str) -> list[Any]:
    """What waits for the commit of this kind, taken; nothing while only a savepoint is
    released (it waits for the real commit)."""
    if session.in_nested_transaction():
        return []
    return list(session.info.get(_AT_COMMIT, {}).pop(kind, None) or [])


def pending_at_commit(session: Session) -> dict[str, list[Any]]:
    """Everything waiting for the commit, to put back after a savepoint rolls back
    (`restore_at_commit`)."""
    return {kind: list(items) for kind, items in session.info.get(_AT_COMMIT, {}).items()}


def restore_at_commit(session: Session, pending: dict[str, list[Any]]) -> None:
    session.info[_AT_COMMIT] = {kind: list(items) for kind, items in pending.items()}


@event.listens_for(Session, "after_rollback")
def _drop_at_commit(session: Session) -> None:
    session.info.pop(_AT_COMMIT, None)


_TRANSITION = "transition"
_TRANSITIONS = cast(Table, TransitionRow.__table__)


def add_transition(session: Session, row: dict[str, Any]) -> None:
    """A transition row, inserted with the transaction's others in one statement when it
    commits. Nothing reads a transition back before the commit, so it needs no mapped
    object: those cost the ORM's flush bookkeeping, six times per request."""
    add_at_commit(session, _TRANSITION, row)


@event.listens_for(Session, "before_commit")
def _insert_transitions(session: Session) -> None:
    rows = take_at_commit(session, _TRANSITION)
    if rows:
        session.flush()  # their requests first: a plain insert does not flush the ORM's rows
        session.connection().execute(insert(_TRANSITIONS), rows)
