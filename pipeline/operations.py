"""What operators do to a request: retry what failed, extend a deadline, cancel, resend.

Each action is checked against the transition table and the law (extensions), recorded
in the audit log with who did it, and told to the person where the law asks.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from pipeline import audit, policy, topology
from pipeline.db import NotificationRow, StoreTaskRow, utcnow
from pipeline.errors import InvalidTransition, UnknownRequest
from pipeline.requests import advance, iso, load, notify_person
from pipeline.states import Jurisdiction, State
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App


def retry_request(app: App, request_id: str, *, actor: str) -> list[str]:
    """Give failed store tasks a fresh budget and resume the phase they failed in."""
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.state != State.NEEDS_ATTENTION.value:
            raise InvalidTransition(f"request is {request.state}, not needing attention")
        failed = list(
            uow.session.execute(
                select(StoreTaskRow).where(
                    StoreTaskRow.request_id == request_id, StoreTaskRow.status == "failed"
                )
            ).scalars()
        )
        phase = failed[0].phase if failed else "act"
        resume = State.LOCATING if phase == "locate" else State.ACTING
        advance(
            uow.session,
            request,
            resume,
            reason=f"retried by an operator ({len(failed)} failed store task(s))",
            actor=actor,
        )
        actor_for = {
            "locate": topology.LOCATE_STORE_ACTOR,
            "act": topology.ACT_STORE_ACTOR,
            "recheck": topology.RECHECK_STORE_ACTOR,
        }
        stamp = uuid.uuid4().hex  # a new key: this is a deliberate second attempt
        stores = []
        for task in failed:
            task.status = "pending"
            task.attempts = 0
            task.last_error = None
            task.updated_at = utcnow()
            stores.append(task.store)
            uow.send(
                f"{request_id}:{task.phase}:{task.store}:retry:{stamp}",
                actor_for[task.phase],
                topology.STORE_QUEUE,
                request_id,
                task.store,
            )
        if not failed:  # stopped for a reason other than a store (e.g. a missing capability)
            uow.send(
                f"{request_id}:act:retry:{stamp}",
                topology.ACT_ACTOR,
                topology.ACT_QUEUE,
                request_id,
            )
        audit.record(
            uow.session, "request_retried", request_id=request_id, actor=actor, stores=stores
        )
    return stores


def extend_deadline(
    app: App,
    request_id: str,
    new_due: datetime,
    reason: str,
    *,
    actor: str,
    now: datetime | None = None,
) -> None:
    """R2: only with a reason, within the original period, within the legal maximum;
    the person is told."""
    now = now or utcnow()
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.completed_at is not None:
            raise InvalidTransition("a finished request cannot be extended")
        policy.extend(
            Jurisdiction(request.jurisdiction),
            request.received_at,
            request.original_due_at,
            new_due,
            reason,
            now,
        )
        old = request.due_at
        request.due_at = new_due
        request.extension_reason = reason
        audit.record(
            uow.session,
            "deadline_extended",
            request_id=request_id,
            actor=actor,
            from_due=iso(old),
            to_due=iso(new_due),
            reason=reason,
        )
        notify_person(
            app,
            uow,
            request,
            f"extension:{iso(new_due)}",
            "extension",
            {
                "request_id": request_id,
                "type": request.type,
                "due_at": iso(new_due),
                "reason": reason,
            },
        )


def cancel_request(app: App, request_id: str, reason: str, *, actor: str) -> None:
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        advance(uow.session, request, State.CANCELLED, reason=reason, actor=actor)


def resend_notification(app: App, request_id: str, event: str, *, actor: str) -> None:
    """Send an email again on purpose (the person lost it): a new event, audited."""
    with UnitOfWork(app) as uow:
        note = uow.session.execute(
            select(NotificationRow).where(
                NotificationRow.request_id == request_id, NotificationRow.event == event
            )
        ).scalar()
        if note is None:
            raise UnknownRequest(f"request {request_id!r} has no {event!r} email")
        request = load(uow.session, request_id)
        context = app.keys.ring.decrypt_json(note.context_enc, context=note.id.encode())
        assert isinstance(context, dict)
        count = len(
            list(
                uow.session.execute(
                    select(NotificationRow.id).where(NotificationRow.request_id == request_id)
                )
            )
        )
        notify_person(app, uow, request, f"{event}:resend:{count}", note.template, context)
        audit.record(uow.session, "email_resent", request_id=request_id, actor=actor, event=event)
