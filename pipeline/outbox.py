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

    def outstanding(self) -> int | None:
        """Messages the broker still holds (queued, delayed or being processed), or None
        when the broker cannot tell."""
        ...


def add(
    session: Session, *, key: str, actor: str, queue: str, args: Sequence[Any]
) -> Envelope | None:
    """Ask for a message once per key; returns its envelope, or None if already asked."""
    existing = session.execute(select(OutboxRow.id).where(OutboxRow.key == key)).scalar()
    if existing is not None:
        return None
    row = OutboxRow(id=str(uuid.uuid4()), key=key, actor=actor, queue=queue, args=list(args))
    session.add(row)
    session.flush()
    return Envelope(id=row.id, actor=actor, queue=queue, args=tuple(args))


def publish(factory: sessionmaker[Session], bus: MessageBus, envelopes: Sequence[Envelope]) -> int:
    """Publish committed envelopes, then mark them published in one statement.

    If publishing stops half way, what was sent is still marked and the error goes up:
    the rest stays unpublished for the relay.
    """
    sent: list[str] = []
    try:
        for envelope in envelopes:
            bus.publish(envelope)
            sent.append(envelope.id)
    finally:
        if sent:
            with transaction(factory) as session:
                session.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id.in_(sent))
                    .values(published_at=utcnow(), publish_count=OutboxRow.publish_count + 1)
                )
    return len(sent)


def publish_pending(
    factory: sessionmaker[Session],
    bus: MessageBus,
    *,
    older_than: timedelta,
    limit: int = 500,
) -> int:
    """The relay: publish rows committed a while ago and never published (a crash between
    commit and publish, or a broker that was down)."""
    with transaction(factory) as session:
        rows = (
            session.execute(
                select(OutboxRow)
                .where(
                    OutboxRow.published_at.is_(None), OutboxRow.created_at <= utcnow() - older_than
                )
                .order_by(OutboxRow.created_at)
                .limit(limit)
            )
            .scalars()
            .all()
        )
        pending = [
            Envelope(id=r.id, actor=r.actor, queue=r.queue, args=tuple(r.args)) for r in rows
        ]
    sent = publish(factory, bus, pending)
    if sent:
        log.info("outbox_relayed", count=sent)
    return sent
