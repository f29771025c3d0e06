"""Intake: accept a request document, or reject it with a specific, recorded reason.

`submit` is what intake systems call (it only enqueues); `accept` is the stage the
`intake` actor runs: validate, dedupe, store with PII encrypted, set the due date,
acknowledge receipt, and ask for the verify stage, all in one commit.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline import audit, batch, contract, policy, topology
from pipeline.contract import IntakeDocument
from pipeline.db import RejectionRow, RequestRow, add_transition, transaction
from pipeline.errors import ConflictingRequest, InvalidRequest
from pipeline.outbox import BATCH_MAX, Envelope, MessageBus
from pipeline.requests import iso, notify_person
from pipeline.states import TERMINAL, State, needs_verification
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()


def submit(doc: Mapping[str, Any] | str | bytes | Any, *, bus: MessageBus | None = None) -> str:
    """Put a request document on the intake queue; returns the message id.

    Only enqueues: validation happens in the intake stage, so every intake path
    (queue, CLI, this function) is judged by the same rules and recorded the same way.
    """
    if bus is None:
        from pipeline.bootstrap import App

        bus = App.from_env().bus
    payload = _as_object(doc) if isinstance(doc, (str, bytes)) else doc
    envelope = Envelope(
        id=str(uuid.uuid4()),
        actor=topology.INTAKE_ACTOR,
        queue=topology.INTAKE_QUEUE,
        args=(payload,),
    )
    bus.publish(envelope)
    return envelope.id


def _as_object(raw: str | bytes) -> Any:
    """Text that is JSON travels as the object; anything else travels as text, so the
    intake stage can reject it with a reason rather than the caller crashing."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


@dataclass(frozen=True)
class IntakeResult:
    status: str  # accepted | duplicate | rejected
    request_id: str | None
    code: str | None = None
    reason: str | None = None


def accept(app: App, raw: Any, *, now: datetime | None = None) -> IntakeResult:
    now = now or datetime.now(UTC)
    if not isinstance(raw, (Mapping, str, bytes)):
        return reject(app, InvalidRequest("document must be a JSON object", code="not_json"), raw)
    try:
        doc = contract.parse(raw, max_bytes=app.settings.max_document_bytes, now=now)
        verified_by = None
        if doc.verification is not None:
            system = contract.check_assertion(doc, app.keys.intake_keys, now)
            verified_by = f"assertion:{system}"
    except InvalidRequest as exc:
        return reject(app, exc, raw)
    fingerprint = app.blind.of(
        "document", hashlib.sha256(contract.content_fingerprint(doc.raw)).hexdigest()
    )
    try:
        subject_hash = app.blind.email(doc.subject.email)
        return app.intake_group.submit(_Valid(doc, fingerprint, subject_hash, verified_by, now))
    except ConflictingRequest as exc:
        return reject(app, exc, raw)


@dataclass(frozen=True)
class _Valid:
    """A document that passed the contract, ready to store."""

    doc: IntakeDocument
    fingerprint: str
    subject_hash: str  # the blind index of the person's email
    verified_by: str | None
    now: datetime


def group_commit(app: App) -> batch.GroupCommit[_Valid, IntakeResult]:
    """Documents that worker threads accept at the same moment are stored in one
    transaction, and their requests move on together (one verify message for the group).
    One per app (`App.intake_group`)."""
    return batch.GroupCommit(lambda items: _store_all(app, items), limit=BATCH_MAX)


def _store_all(app: App, items: list[_Valid]) -> list[IntakeResult | Exception]:
    """Store documents in one transaction; each alone (as it always could be) when there
    is only one, or when a concurrent delivery of the same id broke the shared one."""
    if len(items) > 1:
        try:
            return _commit(app, items)
        except IntegrityError:
            pass
    return [_store_alone(app, item) for item in items]


def _store_alone(app: App, item: _Valid) -> IntakeResult | Exception:
    try:
        return _commit(app, [item])[0]
    except IntegrityError:
        # a concurrent delivery of the same id committed first: judge it as a resubmission
        return _commit(app, [item])[0]


def _commit(app: App, items: list[_Valid]) -> list[IntakeResult | Exception]:
    """The documents in one unit of work: each one's outcome, or the refusal of a reused
    id (raised before it wrote anything). The group's new requests are inserted in one
    statement; what refers to them (transitions, audit entries, acknowledgements,
    messages) follows."""
    results: list[IntakeResult | Exception] = []
    accepted: list[dict[str, Any]] = []
    with UnitOfWork(app) as uow:
        known = _Known.of(uow.session, items)
        new: list[tuple[_Valid, RequestRow]] = []
        for item in items:
            try:
                outcome = _judge(app, item, known)
            except ConflictingRequest as exc:
                results.append(exc)
                continue
            if isinstance(outcome, RequestRow):
                new.append((item, outcome))
                outcome = IntakeResult("accepted", item.doc.request_id)
            results.append(outcome)
        if new:
            uow.session.add_all([request for _, request in new])
            # the rows that refer to them go at the commit: the flush orders by mapper only
            uow.session.flush()
        for item, request in new:
            _announce(app, uow, item, request)
            accepted.append(
                {
                    "request_id": request.id,
                    "type": request.type,
                    "linked": bool(request.linked_to),
                }
            )
    _log_accepted(accepted)
    return results


def _log_accepted(accepted: list[dict[str, Any]]) -> None:
    for fields in accepted:
        log.info("request_accepted", **fields)


@dataclass
class _Known:
    """What the state database holds for a group of documents, read in two queries for
    the whole group and kept up to date as the group's requests are added: the content
    fingerprint stored under each id, and the oldest open request of each subject."""

    fingerprints: dict[str, str]
    oldest_open: dict[str, tuple[datetime, str]]  # subject hash -> (received_at, id)

    @classmethod
    def of(cls, session: Session, items: list[_Valid]) -> _Known:
        ids = [item.doc.request_id for item in items]
        subjects = {item.subject_hash for item in items}
        stored = select(RequestRow.id, RequestRow.content_hash).where(RequestRow.id.in_(ids))
        known = cls(
            {request_id: fingerprint for request_id, fingerprint in session.execute(stored)}, {}
        )
        open_ones = select(RequestRow.subject_hash, RequestRow.received_at, RequestRow.id).where(
            RequestRow.subject_hash.in_(subjects),
            RequestRow.state.notin_([s.value for s in TERMINAL]),
        )
        for subject_hash, received_at, request_id in session.execute(open_ones):
            known.opened(subject_hash, received_at, request_id)
        return known

    def opened(self, subject_hash: str, received_at: datetime, request_id: str) -> None:
        oldest = self.oldest_open.get(subject_hash)
        if oldest is None or (received_at, request_id) < oldest:
            self.oldest_open[subject_hash] = (received_at, request_id)


def _judge(app: App, item: _Valid, known: _Known) -> IntakeResult | RequestRow:
    """A document against what is stored (and what its group stored before it): the
    stored request again (a resubmission), a refusal of a reused id (raised), or the new
    request's row, not yet added."""
    doc, fingerprint, verified_by, now = item.doc, item.fingerprint, item.verified_by, item.now
    existing = known.fingerprints.get(doc.request_id)
    if existing is not None:
        if existing == fingerprint:
            log.info("request_resubmitted", request_id=doc.request_id)
            return IntakeResult("duplicate", doc.request_id)
        raise ConflictingRequest(
            "request_id was already used for a different document",
            code="conflicting_request",
            request_id=doc.request_id,
        )
    subject_hash = item.subject_hash
    oldest = known.oldest_open.get(subject_hash)
    linked = oldest[1] if oldest is not None else None
    due = policy.due_date(doc.jurisdiction, doc.received_at)
    ring = app.keys.ring
    context = doc.request_id.encode()
    payload: dict[str, Any] = {}
    if doc.corrections:
        payload["corrections"] = [list(c) for c in doc.corrections]
    if doc.concern is not None:
        payload["concern"] = doc.concern
    request = RequestRow(
        id=doc.request_id,
        type=doc.type.value,
        jurisdiction=doc.jurisdiction.value,
        channel=doc.channel,
        state=State.RECEIVED.value,
        subject_hash=subject_hash,
        subject_enc=ring.encrypt_json(doc.subject.to_json(), context=context),
        payload_enc=ring.encrypt_json(payload, context=context) if payload else None,
        content_hash=fingerprint,
        schema_version=contract.SCHEMA_ID,
        received_at=doc.received_at,
        due_at=due,
        original_due_at=due,
        verified_by=verified_by,
        verified_at=now if verified_by else None,
        linked_to=linked,
        created_at=now,
        updated_at=now,
    )
    known.fingerprints[request.id] = fingerprint
    known.opened(subject_hash, request.received_at, request.id)
    return request


def _announce(app: App, uow: UnitOfWork, item: _Valid, request: RequestRow) -> None:
    """What follows a new request in its unit of work: its first transition, the audit
    entry, the acknowledgement and the verify message."""
    session = uow.session
    add_transition(
        session,
        {
            "request_id": request.id,
            "from_state": None,
            "to_state": State.RECEIVED.value,
            "reason": None,
            "at": item.now,
        },
    )
    audit.record(
        session,
        "request_received",
        request_id=request.id,
        type=request.type,
        jurisdiction=request.jurisdiction,
        channel=request.channel,
        subject_hash=request.subject_hash,
        due_at=iso(request.due_at),
        linked_to=request.linked_to,
        verified_by=request.verified_by,
    )
    by_email = needs_verification(item.doc.type) and not request.verified_by
    notify_person(
        app,
        uow,
        request,
        "acknowledgement",
        "acknowledgement",
        {
            "request_id": request.id,
            "type": request.type,
            "due_at": iso(request.due_at),
            "received_at": iso(request.received_at),
            "verification": "email" if by_email else "none",
            "jurisdiction": request.jurisdiction,
        },
        new_request=True,
    )
    uow.send(f"{request.id}:verify", topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, request.id)


def reject(app: App, error: InvalidRequest, raw: Any) -> IntakeResult:
    """Record a rejection: the reason and a keyed hash of the document, never its content."""
    try:
        body = (
            raw
            if isinstance(raw, bytes)
            else json.dumps(raw, sort_keys=True, default=str, ensure_ascii=False).encode(
                "utf-8", "replace"
            )
        )
    except (TypeError, ValueError, RecursionError):
        body = repr(type(raw)).encode()
    with transaction(app.sessions) as session:
        session.add(
            RejectionRow(
                request_id=error.request_id,
                code=error.code,
                reason=error.reason,
                size=len(body),
                document_hash=app.blind.of("rejected", hashlib.sha256(body).hexdigest()),
            )
        )
        audit.record(
            session,
            "request_rejected",
            request_id=error.request_id,
            code=error.code,
            reason=error.reason,
        )
    log.warning(
        "request_rejected", request_id=error.request_id, code=error.code, reason=error.reason
    )
    return IntakeResult("rejected", error.request_id, error.code, error.reason)
