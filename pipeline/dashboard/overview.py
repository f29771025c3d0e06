"""What the dashboard reads from the state database: counts, the request list, one
request. Only ids, states, dates, reasons and keyed hashes leave here unless the caller
asks for masked (officers) or revealed (an audited reveal) personal data."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

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
    by_state_type: dict[tuple[str, str], int] = field(default_factory=dict)  # as stored

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


def counts(app: App, *, now: datetime | None = None, attention_limit: int = 20) -> Counts:
    now = now or utcnow()
    is_open = RequestRow.completed_at.is_(None)
    with app.sessions() as session:
        # one pass over the (type, state) index for both tables here and for /metrics
        by_state_type = {
            (state, kind): int(n)
            for state, kind, n in session.execute(
                select(RequestRow.state, RequestRow.type, func.count()).group_by(
                    RequestRow.type, RequestRow.state
                )
            ).all()
        }
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
    by_state: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for (state, kind), n in by_state_type.items():
        by_state[state] += n
        by_type[kind] += n
    return Counts(
        by_state={s.value: by_state[s.value] for s in State},
        by_type={t.value: by_type[t.value] for t in RequestType},
        at_risk=int(at_risk or 0),
        overdue=int(overdue or 0),
        attention=[
            Attention(r.id, r.type, r.state_reason or "stopped; a person must look", r.due_at)
            for r in stuck
        ],
        by_state_type=by_state_type,
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
        # EXISTS, not IN: each candidate row is checked on the (request_id, store, phase)
        # key while the page walks the (due_at, id) index; SQLite would otherwise collect
        # every request the store ever had, then sort them
        query = query.where(
            select(StoreTaskRow.id)
            .where(StoreTaskRow.request_id == RequestRow.id, StoreTaskRow.store == flt.store)
            .exists()
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


def store_names(session: Session) -> list[str]:
    """Every store that has a task, in order. A loose index scan: one seek per store down
    the (store, ...) index (a recursive query, on SQLite and PostgreSQL alike), where
    `SELECT DISTINCT store` would read the index entry of every task."""
    t = StoreTaskRow
    walk = select(func.min(t.store).label("store")).cte("stores", recursive=True)
    following = select(func.min(t.store)).where(t.store > walk.c.store).scalar_subquery()
    walk = walk.union_all(select(following).where(walk.c.store.is_not(None)))
    return list(session.execute(select(walk.c.store).where(walk.c.store.is_not(None))).scalars())


def known_stores(app: App) -> list[str]:
    with app.sessions() as session:
        return store_names(session)


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
    # each touched task's last store call, as (milliseconds, tasks) from the fastest
    latency_counts: tuple[tuple[int, int], ...] = ()

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.attempts if self.attempts else None

    @property
    def latencies_ms(self) -> tuple[int, ...]:
        """Every call time in the window, sorted."""
        return tuple(ms for ms, tasks in self.latency_counts for _ in range(tasks))

    def latency_ms(self, quantile: float) -> int | None:
        """The store call time at `quantile` (nearest rank) of the tasks in the window."""
        total = sum(tasks for _, tasks in self.latency_counts)
        if not total:
            return None
        rank = max(1, math.ceil(quantile * total))
        seen = 0
        for ms, tasks in self.latency_counts:
            seen += tasks
            if seen >= rank:
                return ms
        raise AssertionError("unreachable: the ranks add up to the total")


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
    the time of each touched task's last store call (`duration_ms`).

    The database does the counting, store by store, from indexes that lead with the
    store: a few hundred rows come back per store (one per call time, status and
    window), however many tasks ran (see `_windows_of`)."""
    now = now or utcnow()
    with app.sessions() as session:
        return [_health_of(session, store, now) for store in store_names(session)]


def _health_of(session: Session, store: str, now: datetime) -> StoreHealth:
    t = StoreTaskRow
    mine = t.store == store
    since = now - max(span for _, span in HEALTH_WINDOWS)
    pending = session.scalar(select(func.count()).where(mine, t.status == "pending"))
    last_success = session.scalar(select(func.max(t.completed_at)).where(mine, t.status == "done"))
    # The tasks with an error recorded (a small partial index): the last error, and the
    # attempts of the pending ones, all errored so far.
    pending_errors = [
        func.sum(
            case((and_(t.updated_at >= now - span, t.status == "pending"), t.attempts), else_=0)
        )
        for _, span in HEALTH_WINDOWS
    ]
    errored = session.execute(
        select(func.max(t.updated_at), *pending_errors).where(
            mine, t.last_error.is_not(None), t.updated_at >= since
        )
    ).one()
    windows = _windows_of(session, store, now)
    for i, (name, window) in enumerate(windows.items()):
        windows[name] = replace(window, errors=window.errors + int(errored[1 + i] or 0))
    return StoreHealth(
        store=store,
        last_success=last_success,
        last_error_at=errored[0],
        pending=int(pending or 0),
        windows=windows,
    )


def _windows_of(session: Session, store: str, now: datetime) -> dict[str, WindowHealth]:
    """The store's tasks touched in each window: done, failed, attempts, the errors of
    the tasks that ended (every attempt of a failed one, all but the last of a done one;
    the caller adds those of pending tasks), and how many took each whole number of
    milliseconds (a histogram, so the quantiles stay exact).

    One pass over the longest window on the (store, updated_at, status, attempts,
    duration_ms) index, grouped by call time, status and the narrowest window holding
    the task: a few hundred rows come back however many tasks ran."""
    t = StoreTaskRow
    spans = [span for _, span in HEALTH_WINDOWS]
    assert spans == sorted(spans), "HEALTH_WINDOWS go from the narrowest to the widest"
    narrowest = case(*((t.updated_at >= now - span, i) for i, span in enumerate(spans)))
    rows = session.execute(
        select(t.duration_ms, t.status, narrowest, func.count(), func.sum(t.attempts))
        .where(t.store == store, t.updated_at >= now - spans[-1])
        .group_by(t.duration_ms, t.status, narrowest)
    ).all()
    figures = [[0, 0, 0, 0] for _ in spans]  # done, failed, attempts, errors
    histograms: list[Counter[int]] = [Counter() for _ in spans]
    for ms, status, slot, tasks, attempts in rows:
        errors = attempts if status == "failed" else attempts - tasks if status == "done" else 0
        for i in range(int(slot), len(spans)):  # a window holds the narrower ones
            window = figures[i]
            window[0] += tasks if status == "done" else 0
            window[1] += tasks if status == "failed" else 0
            window[2] += attempts
            window[3] += errors
            if ms is not None:
                histograms[i][ms] += tasks
    windows = {}
    for (name, _), (done, failed, attempts, errors), histogram in zip(
        HEALTH_WINDOWS, figures, histograms, strict=True
    ):
        windows[name] = WindowHealth(
            done, failed, attempts, errors, tuple(sorted(histogram.items()))
        )
    return windows


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
    transitions. Counted in SQL per window, grouped by state and bucket (a CASE on the
    bucket boundaries, the same on SQLite and PostgreSQL), from the `(to_state, at)`
    index: one row per state and bucket comes back, however many requests moved."""
    now = now or utcnow()
    counted = [*(s.value for s in TERMINAL), State.NEEDS_ATTENTION.value]
    t = TransitionRow
    windows = []
    with app.sessions() as session:
        for name, width, count in FLOW_WINDOWS:
            start = now - width * count
            # the latest boundary first: a transition at `now` falls in the last bucket
            bucket = case(*((t.at >= start + width * i, i) for i in reversed(range(count))))
            rows = session.execute(
                select(t.to_state, bucket, func.count())
                .where(t.to_state.in_(counted), t.at >= start, t.at <= now)
                .group_by(t.to_state, bucket)
            ).all()
            finished = [0] * count
            stopped = [0] * count
            for to_state, i, n in rows:
                tally = stopped if to_state == State.NEEDS_ATTENTION.value else finished
                tally[int(i)] += int(n)
            windows.append(
                FlowWindow(
                    name,
                    [Bucket(start + width * i, finished[i], stopped[i]) for i in range(count)],
                )
            )
    return windows
