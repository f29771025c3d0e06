"""A request as operators and intake systems see it: states, stores, emails; never PII."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from pipeline import policy
from pipeline.db import (
    CaseRow,
    ExportRow,
    NotificationRow,
    StoreTaskRow,
    TransitionRow,
    utcnow,
)
from pipeline.requests import iso, load

if TYPE_CHECKING:
    from pipeline.bootstrap import App


def describe_request(app: App, request_id: str) -> dict[str, Any]:
    now = utcnow()
    with app.sessions() as session:
        request = load(session, request_id, lock=False)
        transitions = (
            session.execute(
                select(TransitionRow)
                .where(TransitionRow.request_id == request_id)
                .order_by(TransitionRow.id)
            )
            .scalars()
            .all()
        )
        tasks = (
            session.execute(
                select(StoreTaskRow)
                .where(StoreTaskRow.request_id == request_id)
                .order_by(StoreTaskRow.phase, StoreTaskRow.store)
            )
            .scalars()
            .all()
        )
        notes = (
            session.execute(
                select(NotificationRow)
                .where(NotificationRow.request_id == request_id)
                .order_by(NotificationRow.created_at)
            )
            .scalars()
            .all()
        )
        export = session.execute(
            select(ExportRow).where(ExportRow.request_id == request_id)
        ).scalar()
        case = session.execute(select(CaseRow).where(CaseRow.request_id == request_id)).scalar()
        return {
            "request_id": request.id,
            "type": request.type,
            "state": request.state,
            "reason": request.state_reason,
            "jurisdiction": request.jurisdiction,
            "channel": request.channel,
            "received_at": iso(request.received_at),
            "due_at": iso(request.due_at),
            "original_due_at": iso(request.original_due_at),
            "extension_reason": request.extension_reason,
            "at_risk": request.completed_at is None and policy.is_at_risk(request.due_at, now),
            "overdue": request.completed_at is None and policy.is_overdue(request.due_at, now),
            "verified_by": request.verified_by,
            "linked_to": request.linked_to,
            "completed_at": iso(request.completed_at) if request.completed_at else None,
            "outcome": request.outcome,
            "timeline": [
                {"at": iso(t.at), "from": t.from_state, "to": t.to_state, "reason": t.reason}
                for t in transitions
            ],
            "stores": [
                {
                    "store": t.store,
                    "phase": t.phase,
                    "status": t.status,
                    "attempts": t.attempts,
                    "error": t.last_error,
                    "result": t.result,
                }
                for t in tasks
            ],
            "emails": [
                {
                    "event": n.event,
                    "status": n.status,
                    "attempts": n.attempts,
                    "sent_at": iso(n.sent_at) if n.sent_at else None,
                }
                for n in notes
            ],
            "export": None
            if export is None
            else {
                "size": export.size,
                "expires_at": iso(export.expires_at),
                "downloads": export.downloads,
                "revoked": export.revoked_at is not None,
            },
            "case": None
            if case is None
            else {"id": case.id, "status": case.status, "due_at": iso(case.due_at)},
        }
