"""Identity verification (R7-R10): prove control of the email address before disclosing
or deleting anything.

The link mailed to the person carries a random token signed for this purpose; the
database keeps only its hash, with expiry and single use. Opening the link shows a page;
only the POST from that page confirms, so mail scanners that follow links confirm
nothing.

Nothing here searches a product store: a request is verified before anything is looked
up, so every answer (intake, mail, pages) is the same whether or not we hold data on the
address (R8, no account enumeration).

Confirmation mails are limited per address (`verify_mails_per_email` unanswered links per
`verify_mail_window_seconds`), so that requests submitted in someone else's name cannot
turn us into a mail bomb. Over the limit the request is kept, never dropped: it waits in
`received` with the reason, and the reconciler's periodic re-send of its verify message
mails the link once the address has room (an old link leaves the window, or the person
confirms one).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import structlog
from sqlalchemy import Select, func, or_, select, text
from sqlalchemy.orm import Session

from pipeline import audit, topology
from pipeline.crypto import BadSignature, Expired
from pipeline.db import RequestRow, VerificationRow, free_rows, utcnow
from pipeline.errors import PermanentError
from pipeline.requests import advance, iso, load, notify_person
from pipeline.states import RequestType, State, needs_locate, needs_verification
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()
_PURPOSE = "verify-email"
MAIL_DEFERRED_REASON = (
    "confirmation mail deferred: this address has too many unanswered confirmation mails;"
    " it goes out when one is answered or expires from the window"
)


class LinkRefused(PermanentError):
    """A verification link that cannot confirm: `kind` picks the page the person sees."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # invalid | expired | used


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def send_on(uow: UnitOfWork, request: RequestRow) -> None:
    """Ask for the stage that follows verification."""
    if needs_locate(RequestType(request.type)):
        uow.send(f"{request.id}:locate", topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, request.id)
    else:
        uow.send(f"{request.id}:act", topology.ACT_ACTOR, topology.ACT_QUEUE, request.id)


_T = TypeVar("_T")
IN_FLIGHT = (State.VERIFIED, State.LOCATING, State.ACTING, State.NOTIFYING)
_ROOM = "admission_room"  # session.info: what this transaction may still admit


def _room(app: App, session: Session) -> list[int]:
    """How many more requests this transaction may move past verification without
    anyone's action: `admit_max` less the requests in flight (counted once per
    transaction). Stalled requests (the reconciler's business) do not count, so a store
    that is down does not hold everyone else back for long."""
    room: list[int] | None = session.info.get(_ROOM)
    if room is None:
        since = utcnow() - timedelta(seconds=app.settings.stall_seconds)
        moving = session.scalar(
            select(func.count())
            .select_from(RequestRow)
            .where(
                RequestRow.state.in_([s.value for s in IN_FLIGHT]),
                RequestRow.updated_at >= since,
            )
        )
        room = session.info[_ROOM] = [app.settings.admit_max - int(moving or 0)]
    return room


def admit(uow: UnitOfWork, finished: str) -> None:
    """Ask verification to take on waiting requests: `finished` frees room. The message
    carries no id of its own (`batch.Peers` fills it); the finishing requests of a
    batch share one."""
    uow.send(f"{finished}:admit", topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, [])


def _moves_on_alone(query: Select[_T]) -> Select[_T]:
    """Received requests that verification moves on without anyone's action: a signed
    assertion proved the identity, or the type needs no proof."""
    return query.where(
        RequestRow.state == State.RECEIVED.value,
        or_(
            RequestRow.verified_by.is_not(None),
            RequestRow.type.in_([t.value for t in RequestType if not needs_verification(t)]),
        ),
    )


def waiting_for_room(app: App, session: Session, *, since: datetime) -> bool:
    """Whether a request that needs no one's action, unchanged since `since`, waits
    while there is room for it."""
    if _room(app, session)[0] <= 0:
        return False
    query = _moves_on_alone(select(RequestRow.id)).where(RequestRow.updated_at <= since)
    return session.scalar(query.limit(1)) is not None


def waiting(app: App, session: Session, exclude: list[str], limit: int) -> list[RequestRow]:
    """Received requests that verification moves on without anyone's action (a signed
    assertion proved the identity, or the type needs no proof), oldest first, locked;
    rows another transaction holds are skipped, never waited for. A batch takes them on
    (`batch.Peers`) before their own messages arrive, as many as there is room for."""
    limit = min(limit, _room(app, session)[0])
    if limit <= 0:
        return []
    query = (
        _moves_on_alone(select(RequestRow))
        .where(RequestRow.id.not_in(exclude))
        .order_by(RequestRow.received_at)
        .limit(limit)
    )
    return free_rows(session, query)


def start(app: App, request_id: str, *, now: datetime | None = None) -> None:
    """The verify stage: skip it where the law or a signed assertion allows, else mail a link."""
    now = now or utcnow()
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.state != State.RECEIVED.value:
            return  # already past this stage: a redelivery
        kind = RequestType(request.type)
        if not needs_verification(kind) or request.verified_by:
            room = _room(app, uow.session)
            if room[0] <= 0:  # a finishing request, or the reconciler, admits it later
                log.info("request_waiting_for_room", request_id=request.id)
                return
            room[0] -= 1
            request.verified_by = request.verified_by or "not_required"
            request.verified_at = request.verified_at or now
            advance(
                uow.session,
                request,
                State.VERIFIED,
                reason="verified by signed assertion"
                if request.verified_by.startswith("assertion:")
                else "no verification needed for this request type",
            )
            send_on(uow, request)
            return
        room_at = _mail_room_at(app, uow, request, now)
        if room_at is not None:
            _defer_mail(uow, request, room_at)
            return
        token = secrets.token_urlsafe(32)
        signed = app.keys.signer(_PURPOSE).sign(
            f"{request.id}:{token}",
            ttl_seconds=app.settings.verify_ttl_seconds,
            now=now.timestamp(),
        )
        expires = now + timedelta(seconds=app.settings.verify_ttl_seconds)
        uow.session.add(
            VerificationRow(
                id=str(uuid.uuid4()),
                request_id=request.id,
                token_hash=_token_hash(signed),
                expires_at=expires,
                created_at=now,
            )
        )
        notify_person(
            app,
            uow,
            request,
            "verification",
            "verification",
            {
                "request_id": request.id,
                "type": request.type,
                "link": f"{app.settings.base_url}/verify/{signed}",
                "expires_at": iso(expires),
            },
        )
        advance(
            uow.session,
            request,
            State.AWAITING_VERIFICATION,
            reason="confirmation link mailed to the address on the request",
        )


def _mail_room_at(app: App, uow: UnitOfWork, request: RequestRow, now: datetime) -> datetime | None:
    """None if a confirmation mail may go to this address now, else when the window will
    have room. Counts the links mailed to the same address (by its keyed hash) within the
    window and not yet used: a person who answers their mails is never held back."""
    limit = app.settings.verify_mails_per_email
    if limit <= 0:
        return None  # 0 turns the limit off
    session = uow.session
    if session.get_bind().dialect.name == "postgresql":
        # One verify stage per address at a time decides, so parallel workers cannot each
        # see room for the last slot (SQLite's BEGIN IMMEDIATE serialises writers already).
        lock = int(request.subject_hash[:15], 16)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock})
    window = timedelta(seconds=app.settings.verify_mail_window_seconds)
    mailed = (
        session.execute(
            select(VerificationRow.created_at)
            .join(RequestRow, RequestRow.id == VerificationRow.request_id)
            .where(
                RequestRow.subject_hash == request.subject_hash,
                VerificationRow.created_at > now - window,
                VerificationRow.used_at.is_(None),
            )
            .order_by(VerificationRow.created_at)
        )
        .scalars()
        .all()
    )
    if len(mailed) < limit:
        return None
    return mailed[len(mailed) - limit] + window


def _defer_mail(uow: UnitOfWork, request: RequestRow, room_at: datetime) -> None:
    """Keep the request, unmailed, in `received`: the reconciler re-sends its verify
    message every stall period, and the stage mails the link once there is room."""
    if request.state_reason != MAIL_DEFERRED_REASON:
        request.state_reason = MAIL_DEFERRED_REASON
        audit.record(
            uow.session, "verification_mail_deferred", request_id=request.id, until=iso(room_at)
        )
    log.info("verification_mail_deferred", request_id=request.id, until=iso(room_at))


def request_of_link(app: App, token: str, *, now: datetime | None = None) -> str | None:
    """The request an authentic, unexpired link is bound to, or None; reads no row (the
    web's rate limiter keys a person's budget by it)."""
    try:
        return _unsign(app, token, now or utcnow())
    except LinkRefused:
        return None


def inspect(app: App, token: str, *, now: datetime | None = None) -> str:
    """Check a link without using it (the GET page); returns the request id."""
    now = now or utcnow()
    request_id = _unsign(app, token, now)
    with UnitOfWork(app) as uow:  # reads only: a GET (or a mail scanner) changes nothing
        _check_usable(_row(uow, token), request_id, now)
    return request_id


def confirm(app: App, token: str, *, now: datetime | None = None) -> str:
    """The person pressed the button: mark the link used and move the request on."""
    now = now or utcnow()
    request_id = _unsign(app, token, now)
    with UnitOfWork(app) as uow:
        row = _row(uow, token)
        request = load(uow.session, request_id)
        _check_usable(row, request_id, now)
        if request.state != State.AWAITING_VERIFICATION.value:
            raise LinkRefused("used", "this request no longer waits for confirmation")
        row.used_at = now
        request.verified_by = "email_link"
        request.verified_at = now
        audit.record(uow.session, "identity_verified", request_id=request_id, method="email_link")
        advance(uow.session, request, State.VERIFIED, reason="the person confirmed by email link")
        send_on(uow, request)
    log.info("identity_verified", request_id=request_id, method="email_link")
    return request_id


def _unsign(app: App, token: str, now: datetime) -> str:
    try:
        payload = app.keys.signer(_PURPOSE).unsign(token, now=now.timestamp())
    except Expired as exc:
        raise LinkRefused("expired", "this link has expired") from exc
    except BadSignature as exc:
        raise LinkRefused("invalid", "this link is not valid") from exc
    return payload.split(":", 1)[0]


def _row(uow: UnitOfWork, token: str) -> VerificationRow:
    row = uow.session.execute(
        select(VerificationRow).where(VerificationRow.token_hash == _token_hash(token))
    ).scalar_one_or_none()
    if row is None:
        raise LinkRefused("invalid", "this link is not valid")
    return row


def record_failed_attempt(app: App, token: str) -> None:
    """A confirmation that failed its form check counts against the link (R9): after
    `verify_max_attempts` the link is dead, and the request expires unconfirmed."""
    with UnitOfWork(app) as uow:
        row = uow.session.execute(
            select(VerificationRow).where(VerificationRow.token_hash == _token_hash(token))
        ).scalar_one_or_none()
        if row is None or row.used_at is not None:
            return
        row.attempts += 1
        if row.attempts >= app.settings.verify_max_attempts:
            row.expires_at = min(row.expires_at, utcnow())
            audit.record(
                uow.session, "verification_locked", request_id=row.request_id, attempts=row.attempts
            )


def _check_usable(row: VerificationRow, request_id: str, now: datetime) -> None:
    if row.request_id != request_id:
        raise LinkRefused("invalid", "this link is not valid")
    if row.used_at is not None:
        raise LinkRefused("used", "this link was already used")
    if row.expires_at <= now:
        raise LinkRefused("expired", "this link has expired")


def expire_due(app: App, *, now: datetime | None = None, limit: int = 200) -> int:
    """Close requests whose link expired unconfirmed, and tell the person (R9)."""
    now = now or utcnow()
    with UnitOfWork(app) as uow:
        ids = (
            uow.session.execute(
                select(RequestRow.id)
                .join(VerificationRow, VerificationRow.request_id == RequestRow.id)
                .where(
                    RequestRow.state == State.AWAITING_VERIFICATION.value,
                    VerificationRow.used_at.is_(None),
                    VerificationRow.expires_at <= now,
                )
                .limit(limit)
            )
            .scalars()
            .all()
        )
    for request_id in ids:
        with UnitOfWork(app) as uow:
            request = load(uow.session, request_id)
            if request.state != State.AWAITING_VERIFICATION.value:
                continue
            advance(
                uow.session,
                request,
                State.EXPIRED,
                reason="the person did not confirm the request in time",
            )
            notify_person(
                app,
                uow,
                request,
                "verification_expired",
                "verification_expired",
                {"request_id": request.id, "type": request.type},
            )
    return len(ids)
