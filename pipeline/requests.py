"""Loading, moving and reading requests: the rules every stage shares."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.base import Identity
from pipeline import audit, topology
from pipeline.db import NotificationRow, RequestRow, add_transition, utcnow
from pipeline.errors import UnknownRequest
from pipeline.states import State, check_transition

if TYPE_CHECKING:
    from pipeline.bootstrap import App
    from pipeline.uow import UnitOfWork

log = structlog.get_logger()


LOCKED = "locked_requests"  # session.info: ids a batch's shared transaction has locked


def load(session: Session, request_id: str, *, lock: bool = True) -> RequestRow:
    """The request row, locked against concurrent stage commits on PostgreSQL (or
    already locked by the batch's shared transaction)."""
    if request_id in session.info.get(LOCKED, ()):
        locked = session.get(RequestRow, request_id)
        if locked is not None:
            return locked
    query = select(RequestRow).where(RequestRow.id == request_id)
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    row = session.execute(query).scalar_one_or_none()
    if row is None:
        raise UnknownRequest(f"no request with id {request_id!r}")
    return row


def lock_all(session: Session, request_ids: Sequence[str]) -> list[RequestRow]:
    """The requests of a batch in one statement, locked on PostgreSQL in id order (batches
    that overlap wait for each other, never deadlock). Unknown ids are left out."""
    query = select(RequestRow).where(RequestRow.id.in_(request_ids)).order_by(RequestRow.id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return list(session.execute(query).scalars())


def advance(
    session: Session,
    request: RequestRow,
    new: State,
    *,
    reason: str | None = None,
    actor: str = "system",
) -> None:
    """Move a request along the transition table, with a transition row and an audit entry."""
    current = State(request.state)
    check_transition(current, new)
    now = utcnow()
    request.state = new.value
    request.state_reason = reason
    request.updated_at = now
    if new in (State.DONE, State.EXPIRED, State.CANCELLED):
        request.completed_at = now
    add_transition(
        session,
        {
            "request_id": request.id,
            "from_state": current.value,
            "to_state": new.value,
            "reason": reason,
            "at": now,
        },
    )
    audit.record(
        session,
        "request_state_changed",
        request_id=request.id,
        actor=actor,
        from_state=current.value,
        to_state=new.value,
        reason=reason,
    )
    log.info(
        "request_state_changed", request_id=request.id, from_state=current.value, to_state=new.value
    )


def subject_of(app: App, request: RequestRow) -> dict[str, Any]:
    assert request.subject_enc is not None, "request PII was purged"
    value = app.keys.ring.decrypt_json(request.subject_enc, context=request.id.encode())
    assert isinstance(value, dict)
    return value


def payload_of(app: App, request: RequestRow) -> dict[str, Any]:
    if request.payload_enc is None:
        return {}
    value = app.keys.ring.decrypt_json(request.payload_enc, context=request.id.encode())
    assert isinstance(value, dict)
    return value


def identity_of(
    app: App, request: RequestRow, discovered: Mapping[str, str] | None = None
) -> Identity:
    s = subject_of(app, request)
    ids = dict(discovered or {})
    ids.update(s.get("product_ids") or {})  # what the person told us wins
    return Identity(email=s["email"], name=s.get("name"), phone=s.get("phone"), product_ids=ids)


def notify_person(
    app: App,
    uow: UnitOfWork,
    request: RequestRow,
    event: str,
    template: str,
    context: Mapping[str, Any],
    *,
    new_request: bool = False,
) -> str | None:
    """Queue an email to the person, once per (request, event), and ask for its sending
    in the same commit. Returns the notification id, or None if it was queued before.
    `new_request`: the request was created in this unit of work, so nothing was queued
    for it yet (no need to look)."""
    if not new_request and _queued_before(uow, request.id, event):
        return None
    email = subject_of(app, request)["email"]
    note_id = str(uuid.uuid4())
    ring = app.keys.ring
    uow.add(
        NotificationRow(
            id=note_id,
            request_id=request.id,
            event=event,
            template=template,
            recipient_enc=ring.encrypt(email.encode(), context=note_id.encode()),
            context_enc=ring.encrypt_json(dict(context), context=note_id.encode()),
            message_id=f"<{note_id}@privacy.allego.example>",
        )
    )
    uow.send(f"mail:{note_id}", topology.SEND_EMAIL_ACTOR, topology.NOTIFY_QUEUE, note_id)
    return note_id


def _queued_before(uow: UnitOfWork, request_id: str, event: str) -> bool:
    return any(n.event == event for n in uow.rows_of(NotificationRow, request_id))


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
