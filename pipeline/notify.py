"""Notify: tell the person the outcome; send every queued email exactly once per event.

Emails live in the notification outbox (unique per request and event). `send_email`
delivers one row and marks it sent; a redelivered message finds it sent and does
nothing, so each event reaches the person once (DESIGN invariant 4).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from pipeline import audit
from pipeline.db import CaseRow, ExportRow, NotificationRow, RequestRow, utcnow
from pipeline.errors import MailUnavailable, RetryLater, UnknownRequest
from pipeline.requests import advance, iso, load, notify_person
from pipeline.states import RequestType, State
from pipeline.tasks import tasks_of
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()
DOWNLOAD_PURPOSE = "download-export"


class MailRetry(MailUnavailable, RetryLater):
    def __init__(self, reason: str, delay_ms: int):
        super().__init__(reason)
        self.delay_ms = delay_ms


def download_link(app: App, export: ExportRow) -> str:
    ttl = max(1, int((export.expires_at - utcnow()).total_seconds()))
    token = app.keys.signer(DOWNLOAD_PURPOSE).sign(export.id, ttl_seconds=ttl)
    return f"{app.settings.base_url}/download/{token}"


def _store_titles(app: App) -> dict[str, str]:
    return {name: c.metadata.title for name, c in app.connectors.items()}


def outcome_context(app: App, uow: UnitOfWork, request: RequestRow) -> dict[str, Any]:
    kind = RequestType(request.type)
    titles = _store_titles(app)
    context: dict[str, Any] = {
        "request_id": request.id,
        "type": request.type,
        "received_at": iso(request.received_at),
    }
    searched = [
        {"store": titles.get(t.store, t.store), "records": (t.result or {}).get("records", 0)}
        for t in tasks_of(uow, request.id, "locate")
    ]
    context["searched"] = searched
    acted = {t.store: t.result or {} for t in tasks_of(uow, request.id, "act")}
    if kind is RequestType.ACCESS:
        export = uow.session.execute(
            select(ExportRow).where(ExportRow.request_id == request.id)
        ).scalar_one()
        context.update(
            link=download_link(app, export),
            expires_at=iso(export.expires_at),
            stores=[{"store": titles.get(s, s), **r} for s, r in sorted(acted.items())],
        )
    elif kind is RequestType.CORRECT:
        context["stores"] = [
            {
                "store": titles.get(s, s),
                "applied": r.get("applied", []),
                "not_held": r.get("not_held", []),
                "refused": r.get("refused"),
            }
            for s, r in sorted(acted.items())
        ]
        context["fields"] = sorted({f for r in acted.values() for f in r.get("applied", [])})
    elif kind is RequestType.ERASE:
        context["stores"] = [
            {
                "store": titles.get(s, s),
                "deleted": r.get("deleted", 0),
                "anonymized": r.get("anonymized", 0),
            }
            for s, r in sorted(acted.items())
        ]
        context["retained"] = [
            {"store": titles.get(s, s), **k}
            for s, r in sorted(acted.items())
            for k in r.get("retained", [])
        ]
    elif kind is RequestType.OPT_OUT:
        context["stores"] = [
            {"store": titles.get(s, s), "updated": r.get("updated", 0)}
            for s, r in sorted(acted.items())
        ]
    else:
        case = uow.session.execute(
            select(CaseRow).where(CaseRow.request_id == request.id)
        ).scalar_one()
        context.update(case_id=case.id, due_at=iso(case.due_at))
    return context


def _summary(context: dict[str, Any]) -> dict[str, Any]:
    """Counts for the request row and operators: no links, no PII."""
    keep = {}
    for store in context.get("stores", []):
        keep[store["store"]] = {k: v for k, v in store.items() if k != "store"}
    return {"stores": keep, "retained": len(context.get("retained", []))}


def notify_outcome(app: App, request_id: str) -> None:
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.state != State.NOTIFYING.value:
            return
        context = outcome_context(app, uow, request)
        notify_person(app, uow, request, "outcome", f"outcome_{request.type}", context)
        request.outcome = _summary(context)
        advance(uow.session, request, State.DONE, reason="outcome mailed to the person")


def _lease(app: App) -> timedelta:
    """Long enough for one SMTP conversation to finish or time out."""
    return timedelta(seconds=3 * app.settings.smtp_timeout + 10)


def send_email(app: App, notification_id: str) -> None:
    """Deliver one queued email. A sender first takes a lease on the row, so a dramatiq
    retry and a reconciler nudge arriving together cannot both send it; a sender that dies
    mid-send leaves a lease that expires, and the reconciler tries again."""
    now = utcnow()
    with UnitOfWork(app) as uow:
        query = select(NotificationRow).where(NotificationRow.id == notification_id)
        if uow.session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        note = uow.session.execute(query).scalar_one_or_none()
        if note is None:
            raise UnknownRequest(f"no notification with id {notification_id!r}")
        if note.status == "sent":
            log.info("email_already_sent", notification_id=notification_id)
            return
        if note.status == "sending" and note.claimed_until and note.claimed_until > now:
            log.info("email_being_sent", notification_id=notification_id)
            return
        note.status = "sending"
        note.claimed_until = now + _lease(app)
        note.updated_at = now
        note.attempts += 1
        attempt = note.attempts
        ring = app.keys.ring
        recipient = ring.decrypt(note.recipient_enc, context=note.id.encode()).decode()
        context = ring.decrypt_json(note.context_enc, context=note.id.encode())
        assert isinstance(context, dict)
        rendered = app.mailer.templates.render(note.template, context)
        message = app.mailer.build(recipient, rendered, note.message_id)
        request_id, event = note.request_id, note.event
    try:
        app.mailer.send(message)
    except MailUnavailable as exc:
        with UnitOfWork(app) as uow:
            row = uow.session.get(NotificationRow, notification_id)
            assert row is not None
            row.status = "pending"
            row.claimed_until = None
            row.updated_at = utcnow()
            row.last_error = str(exc)
        delay = min(app.settings.retry_base_ms * 2 ** (attempt - 1), app.settings.retry_max_ms)
        log.warning(
            "email_deferred", notification_id=notification_id, attempt=attempt, error=str(exc)
        )
        raise MailRetry(str(exc), delay) from exc
    _record_sent(app, notification_id, request_id, event)
    log.info("email_sent", request_id=request_id, mail_event=event, notification_id=notification_id)


def _record_sent(app: App, notification_id: str, request_id: str, event: str) -> None:
    """Mark the row sent. The mail is out: if the state database is unreachable (it is
    restarting), keep trying for as long as the lease holds, since giving up would let
    the lease expire and the mail go out again."""
    deadline = time.monotonic() + _lease(app).total_seconds() / 2
    pause = 0.2
    while True:
        try:
            with UnitOfWork(app) as uow:
                row = uow.session.get(NotificationRow, notification_id)
                assert row is not None
                if row.status == "sent":
                    return
                row.status = "sent"
                row.claimed_until = None
                row.sent_at = row.updated_at = utcnow()
                audit.record(
                    uow.session,
                    "email_sent",
                    request_id=request_id,
                    event=event,
                    notification_id=notification_id,
                )
            return
        except OperationalError as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning(
                "email_sent_record_retried",
                notification_id=notification_id,
                error=type(exc).__name__,
            )
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def close_case(app: App, request_id: str, reply: str, *, actor: str) -> None:
    """The privacy team answers a concern; the person gets the reply and their rights."""
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        case = uow.session.execute(
            select(CaseRow).where(CaseRow.request_id == request_id)
        ).scalar_one_or_none()
        if case is None:
            raise UnknownRequest(f"request {request_id!r} has no case")
        if case.status == "closed":
            return
        case.status = "closed"
        case.closed_at = utcnow()
        case.reply_enc = app.keys.ring.encrypt(reply.encode(), context=case.id.encode())
        audit.record(
            uow.session, "case_closed", request_id=request_id, actor=actor, case_id=case.id
        )
        notify_person(
            app,
            uow,
            request,
            "case_reply",
            "case_reply",
            {"request_id": request_id, "case_id": case.id, "reply": reply},
        )
