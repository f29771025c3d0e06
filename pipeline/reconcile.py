"""The reconciler: the state database brings back whatever the broker lost (invariant 3).

Run by the scheduler process every few seconds. It publishes outbox rows whose publish
never happened, expires unconfirmed verifications, resends emails stuck in the outbox,
and re-sends the next message of any request that has not moved for a while: a Redis
restarted empty, a worker killed mid-task or a message dropped between commit and
enqueue all end here, and idempotent stages make the re-send safe.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import func, or_, select

from pipeline import outbox, topology, verification
from pipeline.db import NotificationRow, RequestRow, StoreTaskRow, utcnow
from pipeline.outbox import Envelope
from pipeline.states import RequestType, State, needs_locate
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()

WAITING = (State.AWAITING_VERIFICATION, State.NEEDS_ATTENTION)
ACTIVE = [
    s.value
    for s in State
    if s not in WAITING and s not in (State.DONE, State.EXPIRED, State.CANCELLED)
]


@dataclass
class TickReport:
    published: int = 0
    expired: int = 0
    rekicked: int = 0
    emails: int = 0
    admitted: int = 0


def _message(actor: str, queue: str, *args: str | list[str]) -> Envelope:
    return Envelope(id=str(uuid.uuid4()), actor=actor, queue=queue, args=tuple(args))


def next_messages(request: RequestRow, tasks: list[StoreTaskRow]) -> list[Envelope]:
    """What the request is waiting for, given its state and its store tasks."""
    rid = request.id
    state = State(request.state)
    by_phase: dict[str, list[StoreTaskRow]] = {}
    for t in tasks:
        by_phase.setdefault(t.phase, []).append(t)
    pending = {p: [t for t in ts if t.status == "pending"] for p, ts in by_phase.items()}
    if state is State.RECEIVED:
        return [_message(topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, rid)]
    if state is State.VERIFIED:
        if needs_locate(RequestType(request.type)):
            return [_message(topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, rid)]
        return [_message(topology.ACT_ACTOR, topology.ACT_QUEUE, rid)]
    if state is State.LOCATING:
        if "locate" not in by_phase:
            return [_message(topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, rid)]
        return [
            _message(topology.LOCATE_STORE_ACTOR, topology.STORE_QUEUE, rid, t.store)
            for t in pending.get("locate", [])
        ]
    if state is State.ACTING:
        if pending.get("act"):
            return [
                _message(topology.ACT_STORE_ACTOR, topology.STORE_QUEUE, rid, t.store)
                for t in pending["act"]
            ]
        if pending.get("recheck"):
            return [
                _message(topology.RECHECK_STORE_ACTOR, topology.STORE_QUEUE, rid, t.store)
                for t in pending["recheck"]
            ]
        if "act" not in by_phase:
            return [_message(topology.ACT_ACTOR, topology.ACT_QUEUE, rid)]
        return [_message(topology.FINISH_ACTOR, topology.ACT_QUEUE, rid)]
    if state is State.NOTIFYING:
        return [_message(topology.NOTIFY_ACTOR, topology.NOTIFY_QUEUE, rid)]
    return []


BACKLOG_PATIENCE = 10  # with a backlog, wait this many stall periods before a re-send


def _cutoff(app: App, now: datetime) -> datetime:
    """Since when a request must have been idle to count as stalled.

    While the broker still holds messages, an idle request is most likely waiting in the
    queue behind others: re-sending then only adds to the backlog (a retry storm). So
    with a backlog the reconciler waits much longer; with an empty broker (a Redis that
    restarted empty, or a message lost) one stall period is enough.
    """
    stall = timedelta(seconds=app.settings.stall_seconds)
    backlog = app.bus.outstanding()
    return now - (stall * BACKLOG_PATIENCE if backlog else stall)


def rekick_stalled(app: App, now: datetime, *, limit: int = 200) -> int:
    cutoff = _cutoff(app, now)
    sent = 0
    with UnitOfWork(app) as uow:
        stalled = (
            uow.session.execute(
                select(RequestRow)
                .where(RequestRow.state.in_(ACTIVE), RequestRow.updated_at <= cutoff)
                .order_by(RequestRow.updated_at)
                .limit(limit)
            )
            .scalars()
            .all()
        )
        plans = []
        for request in stalled:
            tasks = list(
                uow.session.execute(
                    select(StoreTaskRow).where(StoreTaskRow.request_id == request.id)
                ).scalars()
            )
            if any(t.updated_at > cutoff for t in tasks if t.status == "pending"):
                continue  # a store task moved recently: it is working or backing off
            plans.append((request.id, next_messages(request, tasks)))
            request.updated_at = now  # wait a full stall period before trying again
    for request_id, messages in plans:
        for envelope in messages:
            app.bus.publish(envelope)
            sent += 1
        log.warning("request_rekicked", request_id=request_id, messages=len(messages))
    return sent


def resend_stuck_emails(app: App, now: datetime) -> int:
    """Nudge emails that have not left: never sent and idle for a stall period, or held by
    a sender whose lease ran out (it died mid-send). At most one nudge per stall period."""
    cutoff = _cutoff(app, now)
    last_activity = func.coalesce(NotificationRow.updated_at, NotificationRow.created_at)
    with UnitOfWork(app) as uow:
        notes = (
            uow.session.execute(
                select(NotificationRow).where(
                    NotificationRow.status != "sent",
                    last_activity <= cutoff,
                    or_(
                        NotificationRow.claimed_until.is_(None),
                        NotificationRow.claimed_until <= now,
                    ),
                )
            )
            .scalars()
            .all()
        )
        ids = []
        for note in notes:
            note.updated_at = now
            ids.append(note.id)
    for note_id in ids:
        app.bus.publish(_message(topology.SEND_EMAIL_ACTOR, topology.NOTIFY_QUEUE, note_id))
    return len(ids)


def admit_waiting(app: App, now: datetime) -> int:
    """Requests that wait for room to be verified are admitted by requests finishing;
    should none finish (they went to an operator, or their messages were lost), ask
    verification once per tick while there is room and someone has waited a while."""
    with app.sessions() as session:
        if not verification.waiting_for_room(app, session, since=now - outbox.RELAY_AFTER):
            return 0
    no_ids: list[str] = []  # verification's peers fill the batch
    app.bus.publish(_message(topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, no_ids))
    return 1


def tick(app: App, *, now: datetime | None = None) -> TickReport:
    now = now or utcnow()
    report = TickReport()
    report.published = outbox.publish_pending(app.sessions, app.bus, older_than=outbox.RELAY_AFTER)
    report.expired = verification.expire_due(app, now=now)
    report.rekicked = rekick_stalled(app, now)
    report.emails = resend_stuck_emails(app, now)
    report.admitted = admit_waiting(app, now)
    if any((report.published, report.expired, report.rekicked, report.emails, report.admitted)):
        log.info("reconciler_ticked", **report.__dict__)
    return report


def run_forever(app: App) -> None:
    interval = app.settings.scheduler_interval_seconds
    log.info("scheduler_started", interval_seconds=interval)
    while True:
        started = time.monotonic()
        try:
            tick(app)
        except Exception as exc:  # a dependency is down: keep the loop alive
            log.error("reconciler_failed", error=type(exc).__name__)
        time.sleep(max(0.1, interval - (time.monotonic() - started)))
