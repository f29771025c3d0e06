"""The transactional outbox (DESIGN invariant 3).

A stage never talks to the broker inside its transaction: it adds an outbox row, keyed
so the same step asks for the same message once, and commits it with the state change.
After the commit the row is published; the scheduler republishes rows whose publish
never happened (a crash between commit and enqueue).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import OutboxRow, transaction, utcnow

log = structlog.get_logger()


@dataclass(frozen=True)
class Envelope:
    """A message on its way to an actor: ids only, never personal data (invariant 2)."""

    id: str
    actor: str
    queue: str
    args: tuple[Any, ...]
    delay_ms: int | None = None


class MessageBus(Protocol):
    """Where envelopes go: dramatiq in production, anything in tests of the domain."""

    def publish(self, envelope: Envelope) -> None: ...


def add(session: Session, *, key: str, actor: str, queue: str, args: Sequence[Any]) -> str | None:
    """Ask for a message once per key; returns the new row's id, or None if already asked."""
    existing = session.execute(select(OutboxRow.id).where(OutboxRow.key == key)).scalar()
    if existing is not None:
        return None
    row = OutboxRow(id=str(uuid.uuid4()), key=key, actor=actor, queue=queue, args=list(args))
    session.add(row)
    session.flush()
    return row.id


def publish_pending(
    factory: sessionmaker[Session],
    bus: MessageBus,
    *,
    ids: Sequence[str] | None = None,
    older_than: timedelta | None = None,
    limit: int = 500,
) -> int:
    """Publish unpublished outbox rows (the given ones, or all older than a moment)."""
    with transaction(factory) as session:
        query = select(OutboxRow).where(OutboxRow.published_at.is_(None))
        if ids is not None:
            if not ids:
                return 0
            query = query.where(OutboxRow.id.in_(ids))
        if older_than is not None:
            query = query.where(OutboxRow.created_at <= utcnow() - older_than)
        rows = session.execute(query.order_by(OutboxRow.created_at).limit(limit)).scalars().all()
        pending = [(r.id, r.actor, r.queue, tuple(r.args)) for r in rows]
    sent = 0
    for row_id, actor, queue, args in pending:
        bus.publish(Envelope(id=row_id, actor=actor, queue=queue, args=args))
        with transaction(factory) as session:
            session.execute(
                update(OutboxRow)
                .where(OutboxRow.id == row_id)
                .values(published_at=utcnow(), publish_count=OutboxRow.publish_count + 1)
            )
        sent += 1
    if sent:
        log.debug("outbox_published", count=sent)
    return sent


def republish(factory: sessionmaker[Session], bus: MessageBus, key: str) -> bool:
    """Send an already-published message again (recovery after the broker lost it)."""
    with transaction(factory) as session:
        row = session.execute(select(OutboxRow).where(OutboxRow.key == key)).scalar_one_or_none()
        if row is None:
            return False
        envelope = Envelope(
            id=str(uuid.uuid4()), actor=row.actor, queue=row.queue, args=tuple(row.args)
        )
        row.published_at = utcnow()
        row.publish_count += 1
    bus.publish(envelope)
    return True
