"""Notify: tell the person the outcome; send every queued email exactly once per event.

Emails live in the notification outbox (unique per request and event). `send_email`
delivers a message's batch of rows and marks them sent; a redelivered message finds them
sent and does nothing, so each event reaches the person once (DESIGN invariant 4).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from typing import TYPE_CHECKING, Any, TypeVarTuple

import structlog
from sqlalchemy import Select, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pipeline import audit, verification
from pipeline.db import CaseRow, ExportRow, NotificationRow, RequestRow, free_rows, utcnow
from pipeline.errors import MailUnavailable, RetryLater, UnknownRequest
from pipeline.outbox import as_ids
from pipeline.requests import advance, iso, load, notify_person
from pipeline.states import RequestType, State
from pipeline.tasks import tasks_of
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()
_Columns = TypeVarTuple("_Columns")
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


def _export_of(uow: UnitOfWork, request_id: str) -> ExportRow:
    (export,) = uow.rows_of(ExportRow, request_id)
    return export


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
        export = _export_of(uow, request.id)
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
        verification.admit(uow, request.id)  # room for a request waiting to be verified


def _lease(app: App, mails: int = 1) -> timedelta:
    """Long enough for `mails` SMTP conversations, one after another, to finish or time
    out: a batch leases the mails up to its next record at once, so the last one waits
    for the others."""
    return timedelta(seconds=(3 * app.settings.smtp_timeout + 10) * mails)


@dataclass(frozen=True)
class _Outgoing:
    """A claimed email, built and ready to go: all the sender needs after the claim."""

    notification_id: str
    request_id: str
    event: str
    attempt: int
    message: Message


def _in_id_order(session: Session, query: Select[*_Columns]) -> Select[*_Columns]:
    """Locked on PostgreSQL in id order: overlapping batches wait, never deadlock."""
    query = query.order_by(NotificationRow.id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return query


RECORD_EVERY = 10  # mails sent between two records of what went out


def send_email(app: App, notification_ids: str | Sequence[str]) -> None:
    """Deliver a batch of queued emails, each once.

    One transaction takes a lease on every mail still to send, so a dramatiq retry and a
    reconciler nudge arriving together cannot both send it; a sender that dies mid-send
    leaves leases that expire, and the reconciler tries again. The mails go out with no
    transaction open, and every `RECORD_EVERY` mails one transaction records those sent
    and renews the lease of the rest: a batch costs a handful of statements per ten
    mails instead of seven per mail, and a crash between the server taking mails and
    their record sends at most those again.

    As in `pipeline.batch`, one mail's failure holds back nobody: a mail the server
    refused is put back and the batch retried with the shortest delay; an unknown id
    fails the message only after the others went, and only if nothing is left to retry.
    """
    ids = list(dict.fromkeys(as_ids(notification_ids)))
    lease_end = time.monotonic() + _lease(app, RECORD_EVERY).total_seconds()
    outgoing, unknown = _claim(app, ids)
    sent: list[_Outgoing] = []
    refused: list[tuple[_Outgoing, MailUnavailable]] = []
    for start in range(0, len(outgoing), RECORD_EVERY):
        chunk, rest = outgoing[start : start + RECORD_EVERY], outgoing[start + RECORD_EVERY :]
        went: list[_Outgoing] = []
        back: list[tuple[_Outgoing, MailUnavailable]] = []
        try:
            for mail in chunk:
                try:
                    app.mailer.send(mail.message)
                except MailUnavailable as exc:
                    back.append((mail, exc))
                else:
                    went.append(mail)
        finally:  # even when interrupted (a time limit): what went out must be recorded
            if went or back or rest:
                _record_sent(app, went, back, [m.notification_id for m in rest], lease_end)
        lease_end = time.monotonic() + _lease(app, RECORD_EVERY).total_seconds()
        sent += went
        refused += back
    for mail in sent:
        log.info(
            "email_sent",
            request_id=mail.request_id,
            mail_event=mail.event,
            notification_id=mail.notification_id,
        )
    for mail, error in refused:
        log.warning(
            "email_deferred",
            notification_id=mail.notification_id,
            attempt=mail.attempt,
            error=str(error),
        )
    missing = [UnknownRequest(f"no notification with id {i!r}") for i in unknown]
    for problem in missing:
        log.error("batch_item_failed", error=type(problem).__name__, reason=str(problem))
    if refused:  # a retry wins: the unknown ids fail the message once nothing is left
        mail, error = min(refused, key=lambda r: r[0].attempt)  # the shortest delay
        raise MailRetry(str(error), _retry_delay(app, mail.attempt)) from error
    if missing:
        raise missing[0]


def _retry_delay(app: App, attempt: int) -> int:
    return min(app.settings.retry_base_ms * 2 ** (attempt - 1), app.settings.retry_max_ms)


def _claim(app: App, ids: list[str]) -> tuple[list[_Outgoing], list[str]]:
    """Lease the batch's mails that are neither sent nor held by another sender, and
    build them; returns them with the ids that name no notification."""
    now = utcnow()
    outgoing: list[_Outgoing] = []
    with UnitOfWork(app) as uow:
        query = select(NotificationRow).where(NotificationRow.id.in_(ids))
        notes = list(uow.session.execute(_in_id_order(uow.session, query)).scalars())
        found = {note.id for note in notes}
        notes += _waiting(uow.session, found, SEND_MAX - len(notes))
        ring = app.keys.ring
        for note in notes:
            if note.status == "sent":
                log.info("email_already_sent", notification_id=note.id)
                continue
            if note.status == "sending" and note.claimed_until and note.claimed_until > now:
                log.info("email_being_sent", notification_id=note.id)
                continue
            recipient = ring.decrypt(note.recipient_enc, context=note.id.encode()).decode()
            context = ring.decrypt_json(note.context_enc, context=note.id.encode())
            assert isinstance(context, dict)
            rendered = app.mailer.templates.render(note.template, context)
            message = app.mailer.build(recipient, rendered, note.message_id)
            outgoing.append(
                _Outgoing(note.id, note.request_id, note.event, note.attempts + 1, message)
            )
        if outgoing:
            uow.session.execute(
                update(NotificationRow)
                .where(NotificationRow.id.in_([m.notification_id for m in outgoing]))
                .values(
                    status="sending",
                    claimed_until=now + _lease(app, min(len(outgoing), RECORD_EVERY)),
                    updated_at=now,
                    attempts=NotificationRow.attempts + 1,
                )
            )
    return outgoing, [i for i in ids if i not in found]


SEND_MAX = 50  # mails one send_email message sends, its own and those it takes on


def _waiting(session: Session, taken: set[str], room: int) -> list[NotificationRow]:
    """Mails never tried that wait for their sender, oldest first, to send with the
    batch: under load the acknowledgements of requests accepted one by one pile up as
    messages of one mail each, and the first sender takes them all on. Their own messages
    then find them sent, or leased (`_claim`). Rows another sender holds are skipped,
    never waited for; a mail the server refused (attempts > 0) waits for its own retry."""
    if room <= 0:
        return []
    query = (
        select(NotificationRow)
        .where(
            NotificationRow.status == "pending",
            NotificationRow.attempts == 0,
            NotificationRow.id.notin_(taken),
        )
        .order_by(NotificationRow.created_at)
        .limit(room)
    )
    return free_rows(session, query)


def _record_sent(
    app: App,
    sent: list[_Outgoing],
    refused: list[tuple[_Outgoing, MailUnavailable]],
    rest: list[str],
    lease_end: float,
) -> None:
    """Mark the sent mails sent, one audit entry each, put the refused ones back, and
    renew the lease of the batch's mails still to go (`rest`) for the next ones.

    The mails are out: if the state database is unreachable (it is restarting), keep
    trying for half of what is left of the lease, since giving up would let the lease
    expire and the mails go out again."""
    deadline = time.monotonic() + max(lease_end - time.monotonic(), 0) / 2
    pause = 0.2
    ids = [m.notification_id for m in sent] + [m.notification_id for m, _ in refused]
    while True:
        try:
            with UnitOfWork(app) as uow:
                session = uow.session
                # every row this transaction writes, locked at once in id order (the
                # lease renewals too): a sender claiming some of them waits, never deadlocks
                query = select(NotificationRow.id, NotificationRow.status).where(
                    NotificationRow.id.in_(ids + rest)
                )
                status = {i: s for i, s in session.execute(_in_id_order(session, query))}
                # a row sent by now (or gone, purged) has nothing left to record
                done = [m for m in sent if status.get(m.notification_id, "sent") != "sent"]
                now = utcnow()
                if done:
                    session.execute(
                        update(NotificationRow)
                        .where(NotificationRow.id.in_([m.notification_id for m in done]))
                        .values(status="sent", claimed_until=None, sent_at=now, updated_at=now)
                    )
                for mail in done:
                    audit.record(
                        session,
                        "email_sent",
                        request_id=mail.request_id,
                        event=mail.event,
                        notification_id=mail.notification_id,
                    )
                back = [
                    {
                        "id": mail.notification_id,
                        "status": "pending",
                        "claimed_until": None,
                        "updated_at": now,
                        "last_error": str(exc),
                    }
                    for mail, exc in refused
                    if status.get(mail.notification_id, "sent") != "sent"
                ]
                if back:
                    session.execute(update(NotificationRow), back)
                if rest:
                    session.execute(
                        update(NotificationRow)
                        .where(NotificationRow.id.in_(rest), NotificationRow.status == "sending")
                        .values(claimed_until=now + _lease(app, min(len(rest), RECORD_EVERY)))
                    )
            return
        except OperationalError as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning(
                "email_sent_record_retried",
                notifications=len(ids),
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
