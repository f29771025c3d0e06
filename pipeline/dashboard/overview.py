"""What the dashboard reads from the state database: counts, the request list, one
request. Only ids, states, dates, reasons and keyed hashes leave here unless the caller
asks for masked (officers) or revealed (an audited reveal) personal data."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select

from pipeline import audit, policy, topology
from pipeline.dashboard.masking import mask_subject
from pipeline.db import (
    AuditRow,
    NotificationRow,
    RequestRow,
    StoreTaskRow,
    TransitionRow,
    transaction,
    utcnow,
)
from pipeline.errors import PermanentError
from pipeline.requests import payload_of, subject_of
from pipeline.states import TERMINAL, TRANSITIONS, Jurisdiction, RequestType, State
from pipeline.status import describe_request

if TYPE_CHECKING:
    from pipeline.bootstrap import App

PAGE_SIZE = 50
QUEUES = topology.ALL_QUEUES
HASH_PREFIX = 12  # enough of the keyed subject hash to tell people apart, not to look up
_STORE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BadFilter(PermanentError):
    """A list filter or page cursor that is not one the dashboard makes."""


# -- counts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attention:
    request_id: str
    type: str
    reason: str
    due_at: datetime


@dataclass(frozen=True)
class Counts:
    by_state: dict[str, int]
    by_type: dict[str, int]
    at_risk: int
    overdue: int
    attention: list[Attention]

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


def counts(app: App, *, now: datetime | None = None, attention_limit: int = 20) -> Counts:
    now = now or utcnow()
    is_open = RequestRow.completed_at.is_(None)
    with app.sessions() as session:
        by_state = dict(
            session.execute(select(RequestRow.state, func.count()).group_by(RequestRow.state)).all()
        )
        by_type = dict(
            session.execute(select(RequestRow.type, func.count()).group_by(RequestRow.type)).all()
        )
        at_risk = session.scalar(
            select(func.count()).where(
                is_open,
                RequestRow.due_at >= now,
                RequestRow.due_at <= now + policy.AT_RISK_WINDOW,
            )
        )
        overdue = session.scalar(select(func.count()).where(is_open, RequestRow.due_at < now))
        stuck = session.execute(
            select(RequestRow.id, RequestRow.type, RequestRow.state_reason, RequestRow.due_at)
            .where(RequestRow.state == State.NEEDS_ATTENTION.value)
            .order_by(RequestRow.due_at, RequestRow.id)
            .limit(attention_limit)
        ).all()
    return Counts(
        by_state={s.value: int(by_state.get(s.value, 0)) for s in State},
        by_type={t.value: int(by_type.get(t.value, 0)) for t in RequestType},
        at_risk=int(at_risk or 0),
        overdue=int(overdue or 0),
        attention=[
            Attention(r.id, r.type, r.state_reason or "stopped; a person must look", r.due_at)
            for r in stuck
        ],
    )


# -- the list ----------------------------------------------------------------------------


def _choice(args: Mapping[str, str], name: str, allowed: set[str]) -> str | None:
    value = (args.get(name) or "").strip()
    if not value:
        return None
    if value not in allowed:
        raise BadFilter(f"{name} must be one of {', '.join(sorted(allowed))}")
    return value


@dataclass(frozen=True)
class RequestFilter:
    state: str | None = None
    type: str | None = None
    store: str | None = None
    jurisdiction: str | None = None
    due_before: date | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> RequestFilter:
        store = (args.get("store") or "").strip() or None
        if store is not None and not _STORE.match(store):
            raise BadFilter("store must be a store name")
        raw_due = (args.get("due_before") or "").strip()
        try:
            due_before = date.fromisoformat(raw_due) if raw_due else None
        except ValueError as exc:
            raise BadFilter("due_before must be a date, YYYY-MM-DD") from exc
        return cls(
            state=_choice(args, "state", {s.value for s in State}),
            type=_choice(args, "type", {t.value for t in RequestType}),
            store=store,
            jurisdiction=_choice(args, "jurisdiction", {j.value for j in Jurisdiction}),
            due_before=due_before,
        )

    def as_args(self) -> dict[str, str]:
        values = {
            "state": self.state,
            "type": self.type,
            "store": self.store,
            "jurisdiction": self.jurisdiction,
            "due_before": self.due_before.isoformat() if self.due_before else None,
        }
        return {k: v for k, v in values.items() if v}


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: keyset pagination on (due_at, id), which the
    `ix_requests_due_at_id` index serves at any depth."""

    due_at: datetime
    request_id: str

    def encode(self) -> str:
        return f"{self.due_at.strftime('%Y%m%dT%H%M%S.%f')}~{self.request_id}"

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        moment, sep, request_id = raw.partition("~")
        try:
            due = datetime.strptime(moment, "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
        except ValueError as exc:
            raise BadFilter("the page cursor is not one this dashboard made") from exc
        if not sep or not request_id:
            raise BadFilter("the page cursor is not one this dashboard made")
        return cls(due, request_id)


@dataclass(frozen=True)
class ListedRequest:
    id: str
    type: str
    state: str
    jurisdiction: str
    received_at: datetime
    due_at: datetime
    reason: str | None
    subject_ref: str  # a prefix of the keyed hash: no personal data
    subject: dict[str, str] | None  # masked, for officers; None for viewers
    at_risk: bool
    overdue: bool


@dataclass(frozen=True)
class Page:
    items: list[ListedRequest]
    next: Cursor | None
    stores: list[str] = field(default_factory=list)


def list_requests(
    app: App,
    flt: RequestFilter,
    *,
    after: Cursor | None = None,
    masked_pii: bool = False,
    limit: int | None = None,
    now: datetime | None = None,
) -> Page:
    """One page, soonest due first. Ciphertexts are read, and decrypted to be masked,
    only for officers, and only for the rows on this page."""
    now = now or utcnow()
    limit = limit or PAGE_SIZE
    columns = [
        RequestRow.id,
        RequestRow.type,
        RequestRow.state,
        RequestRow.jurisdiction,
        RequestRow.received_at,
        RequestRow.due_at,
        RequestRow.state_reason,
        RequestRow.subject_hash,
        RequestRow.completed_at,
    ]
    if masked_pii:
        columns.append(RequestRow.subject_enc)
    query = select(*columns)
    if flt.state:
        query = query.where(RequestRow.state == flt.state)
    if flt.type:
        query = query.where(RequestRow.type == flt.type)
    if flt.jurisdiction:
        query = query.where(RequestRow.jurisdiction == flt.jurisdiction)
    if flt.due_before:
        query = query.where(RequestRow.due_at < datetime.combine(flt.due_before, time(), UTC))
    if flt.store:
        query = query.where(
            RequestRow.id.in_(
                select(StoreTaskRow.request_id).where(StoreTaskRow.store == flt.store)
            )
        )
    if after is not None:
        query = query.where(
            or_(
                RequestRow.due_at > after.due_at,
                and_(RequestRow.due_at == after.due_at, RequestRow.id > after.request_id),
            )
        )
    query = query.order_by(RequestRow.due_at, RequestRow.id).limit(limit + 1)
    with app.sessions() as session:
        rows = session.execute(query).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = []
    for r in rows:
        subject = None
        if masked_pii:
            subject = (
                {"email": "(erased)"}
                if r.subject_enc is None
                else mask_subject(_decrypt_subject(app, r.id, r.subject_enc))
            )
        is_open = r.completed_at is None
        items.append(
            ListedRequest(
                id=r.id,
                type=r.type,
                state=r.state,
                jurisdiction=r.jurisdiction,
                received_at=r.received_at,
                due_at=r.due_at,
                reason=r.state_reason,
                subject_ref=r.subject_hash[:HASH_PREFIX],
                subject=subject,
                at_risk=is_open and policy.is_at_risk(r.due_at, now),
                overdue=is_open and policy.is_overdue(r.due_at, now),
            )
        )
    last = rows[-1] if rows else None
    return Page(items, Cursor(last.due_at, last.id) if more and last else None)


def _decrypt_subject(app: App, request_id: str, blob: bytes) -> dict[str, Any]:
    value = app.keys.ring.decrypt_json(blob, context=request_id.encode())
    assert isinstance(value, dict)
    return value


def known_stores(app: App) -> list[str]:
    with app.sessions() as session:
        return list(
            session.execute(select(StoreTaskRow.store).distinct().order_by("store")).scalars()
        )


# -- one request -------------------------------------------------------------------------


def request_detail(app: App, request_id: str) -> dict[str, Any]:
    """`describe_request` (the no-PII view), with times for store tasks and emails, the
    audit trail, and which actions the request's state allows."""
    info = describe_request(app, request_id)
    with app.sessions() as session:
        row = session.get(RequestRow, request_id)
        assert row is not None
        tasks = {
            (t.phase, t.store): t
            for t in session.execute(
                select(StoreTaskRow).where(StoreTaskRow.request_id == request_id)
            ).scalars()
        }
        notes = {
            n.event: n
            for n in session.execute(
                select(NotificationRow).where(NotificationRow.request_id == request_id)
            ).scalars()
        }
        trail = list(
            session.execute(
                select(AuditRow).where(AuditRow.request_id == request_id).order_by(AuditRow.id)
            ).scalars()
        )
    for store in info["stores"]:
        task = tasks[(store["phase"], store["store"])]
        store["updated_at"] = task.updated_at
        store["completed_at"] = task.completed_at
    for email in info["emails"]:
        note = notes[email["event"]]
        email["created_at"] = note.created_at
        email["error"] = note.last_error
    state = State(row.state)
    info.update(
        subject_ref=row.subject_hash[:HASH_PREFIX],
        has_pii=row.subject_enc is not None,
        audit=[
            {"at": a.at, "actor": a.actor, "action": a.action, "detail": a.detail} for a in trail
        ],
        can_retry=state is State.NEEDS_ATTENTION,
        can_cancel=State.CANCELLED in TRANSITIONS[state],
        can_extend=row.completed_at is None,
        can_close_case=info["case"] is not None and info["case"]["status"] == "open",
        finished=state in TERMINAL,
    )
    return info


def masked_subject(app: App, request_id: str) -> dict[str, str] | None:
    with app.sessions() as session:
        row = session.get(RequestRow, request_id)
        if row is None or row.subject_enc is None:
            return None
        return mask_subject(subject_of(app, row))


def reveal(app: App, request_id: str, *, actor: str, why: str) -> dict[str, Any] | None:
    """Record who looks and why (R29), in the same commit as the look, then decrypt."""
    with transaction(app.sessions) as session:
        row = session.get(RequestRow, request_id)
        if row is None or row.subject_enc is None:
            return None
        audit.record(session, "pii_revealed", request_id=request_id, actor=actor, reason=why)
        payload = payload_of(app, row)
        return {
            "subject": subject_of(app, row),
            "corrections": [tuple(c) for c in payload.get("corrections") or []],
            "concern": payload.get("concern"),
        }


def parse_due(raw: str) -> datetime:
    """A date from the extend form, as the start of that day in UTC."""
    try:
        return datetime.combine(date.fromisoformat(raw.strip()), time(), UTC)
    except ValueError as exc:
        raise BadFilter("the new due date must be a date, YYYY-MM-DD") from exc


def default_extension(due_at: datetime) -> date:
    return (due_at + timedelta(days=30)).date()


# -- connector health --------------------------------------------------------------------

HEALTH_WINDOWS = (("hour", timedelta(hours=1)), ("day", timedelta(days=1)))


@dataclass(frozen=True)
class WindowHealth:
    done: int  # tasks completed in the window
    failed: int  # tasks that failed for good in the window
    attempts: int  # attempts of the tasks touched in the window
    errors: int  # of those, the attempts that errored
    latencies_ms: tuple[int, ...] = ()  # each touched task's last store call, sorted

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.attempts if self.attempts else None

    def latency_ms(self, quantile: float) -> int | None:
        """The store call time at `quantile` (nearest rank) of the tasks in the window."""
        if not self.latencies_ms:
            return None
        rank = max(1, math.ceil(quantile * len(self.latencies_ms)))
        return self.latencies_ms[rank - 1]


def _window(tally: list[int], latencies: list[int]) -> WindowHealth:
    done, failed, attempts, errors = tally
    return WindowHealth(done, failed, attempts, errors, tuple(sorted(latencies)))


@dataclass(frozen=True)
class StoreHealth:
    store: str
    last_success: datetime | None
    last_error_at: datetime | None
    pending: int
    windows: dict[str, WindowHealth]

    @property
    def failing(self) -> bool:
        """Errors in the last hour and no success since the last error."""
        hour = self.windows["hour"]
        return hour.errors > 0 and (
            self.last_success is None
            or (self.last_error_at is not None and self.last_error_at > self.last_success)
        )


def store_health(app: App, *, now: datetime | None = None) -> list[StoreHealth]:
    """Per store, from `store_tasks`: the last success, and per window the tasks done and
    failed and the share of attempts that errored. An attempt counts as errored when the
    task ended `failed` (every attempt), ended `done` (all but the last), or is pending
    with an error recorded (each attempt so far; one may still be running). Latency is
    the time of each touched task's last store call (`duration_ms`)."""
    now = now or utcnow()
    t = StoreTaskRow
    longest = max(span for _, span in HEALTH_WINDOWS)
    with app.sessions() as session:
        # counts by (store, status) and the last success per store come from the
        # (store, status) index; the windows read only the tasks touched in the last day
        by_status = session.execute(
            select(t.store, t.status, func.count()).group_by(t.store, t.status)
        ).all()
        stores = sorted({store for store, _, _ in by_status})
        last_success = {
            store: session.scalar(
                select(func.max(t.completed_at)).where(t.store == store, t.status == "done")
            )
            for store in stores
        }
        recent = session.execute(
            select(
                t.store,
                t.status,
                t.attempts,
                t.last_error.is_not(None),
                t.updated_at,
                t.duration_ms,
            ).where(t.updated_at >= now - longest)
        ).all()
    pending = {store: n for store, status, n in by_status if status == "pending"}
    tally = {(store, name): [0, 0, 0, 0] for store in stores for name, _ in HEALTH_WINDOWS}
    latencies: dict[tuple[str, str], list[int]] = defaultdict(list)
    last_error: dict[str, datetime] = {}
    for store, status, attempts, has_error, updated_at, duration_ms in recent:
        if status == "failed":
            errors = attempts
        elif status == "done":
            errors = attempts - 1
        else:
            errors = attempts if has_error else 0
        if has_error and (store not in last_error or updated_at > last_error[store]):
            last_error[store] = updated_at
        for name, span in HEALTH_WINDOWS:
            if updated_at >= now - span:
                counts_ = tally[(store, name)]
                counts_[0] += status == "done"
                counts_[1] += status == "failed"
                counts_[2] += attempts
                counts_[3] += errors
                if duration_ms is not None:
                    latencies[(store, name)].append(duration_ms)
    return [
        StoreHealth(
            store=store,
            last_success=last_success[store],
            last_error_at=last_error.get(store),
            pending=int(pending.get(store, 0)),
            windows={
                name: _window(tally[(store, name)], latencies[(store, name)])
                for name, _ in HEALTH_WINDOWS
            },
        )
        for store in stores
    ]


# -- flow over time ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    start: datetime
    finished: int  # requests that reached a final state
    stopped: int  # requests that stopped for a person (needs_attention)


@dataclass(frozen=True)
class FlowWindow:
    name: str
    buckets: list[Bucket]

    @property
    def finished(self) -> int:
        return sum(b.finished for b in self.buckets)

    @property
    def stopped(self) -> int:
        return sum(b.stopped for b in self.buckets)

    @property
    def failure_rate(self) -> float | None:
        """Of the requests that finished or stopped in the window, the share stopped."""
        total = self.finished + self.stopped
        return self.stopped / total if total else None

    @property
    def tallest(self) -> int:
        return max([b.finished + b.stopped for b in self.buckets] + [1])


FLOW_WINDOWS = (("hour", timedelta(minutes=5), 12), ("day", timedelta(hours=1), 24))


def flow(app: App, *, now: datetime | None = None) -> list[FlowWindow]:
    """Throughput (requests reaching a final state) and failures (requests stopping for
    a person) per 5 minutes over the last hour and per hour over the last day, from the
    transitions. Only requests updated in the last day are looked at (through the
    `requests.updated_at` index: a transition always touches it)."""
    now = now or utcnow()
    since = now - timedelta(days=1)
    final = [s.value for s in TERMINAL]
    counted = [*final, State.NEEDS_ATTENTION.value]
    with app.sessions() as session:
        rows = session.execute(
            select(TransitionRow.to_state, TransitionRow.at).where(
                TransitionRow.request_id.in_(
                    select(RequestRow.id).where(RequestRow.updated_at >= since)
                ),
                TransitionRow.at >= since,
                TransitionRow.to_state.in_(counted),
            )
        ).all()
    windows = []
    for name, width, count in FLOW_WINDOWS:
        start = now - width * count
        finished = [0] * count
        stopped = [0] * count
        for to_state, at in rows:
            if at < start or at > now:
                continue
            i = min(int((at - start) / width), count - 1)
            if to_state == State.NEEDS_ATTENTION.value:
                stopped[i] += 1
            else:
                finished[i] += 1
        windows.append(
            FlowWindow(
                name,
                [Bucket(start + width * i, finished[i], stopped[i]) for i in range(count)],
            )
        )
    return windows
