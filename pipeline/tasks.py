"""Per-store tasks: claim, call the connector outside any transaction, record, fan in.

A store task row (request, store, phase) is the unit of idempotency: a redelivered
message finds it done and does nothing. Attempts are counted in the row, so the retry
budget survives a broker that forgets its messages. When the last task of a phase
finishes, the caller's `on_all_done` moves the request on, in the same commit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from connectors.base import BatchReads, Connector, ConnectorError, Identity
from pipeline import audit
from pipeline.db import RequestRow, StoreTaskRow, utcnow
from pipeline.errors import RetryLater, StoreFailed, UnknownRequest
from pipeline.requests import advance, identity_of, lock_all
from pipeline.states import TRANSITIONS, State
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()


class StoreRetry(StoreFailed, RetryLater):
    """A store task failed and will be tried again after `delay_ms`."""

    def __init__(self, reason: str, delay_ms: int):
        super().__init__(reason)
        self.delay_ms = delay_ms


@dataclass(frozen=True)
class TaskOutcome:
    result: dict[str, Any]  # counts and flags: stored in clear, shown to operators
    detail: Any = None  # anything holding personal data: stored encrypted
    failed_for_good: str | None = None  # a verified problem that retrying cannot fix
    events: tuple[tuple[str, dict[str, Any]], ...] = ()  # audit entries (PII-free details)


StoreCall = tuple[Identity, RequestRow]  # who, and the request asking
# What a phase does in a store for a batch of calls: one outcome, or the exception that
# call raised, per call and in order. Raising fails the batch: each call is then retried
# alone (see `_call_store`).
StoreWork = Callable[[Connector, Sequence[StoreCall]], list[TaskOutcome | Exception]]


def one_by_one(step: Callable[[Connector, Identity, RequestRow], TaskOutcome]) -> StoreWork:
    """A per-request step as store work: each call made alone, and what it raises is its
    own outcome, so one request's failure is never another's."""

    def work(connector: Connector, calls: Sequence[StoreCall]) -> list[TaskOutcome | Exception]:
        outcomes: list[TaskOutcome | Exception] = []
        for identity, request in calls:
            try:
                outcomes.append(step(connector, identity, request))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    return work


PHASE_STATE = {"locate": State.LOCATING, "act": State.ACTING, "recheck": State.ACTING}
PHASE_WORDS = {"locate": "searching", "act": "acting on", "recheck": "re-checking"}


def describe(exc: BaseException) -> str:
    """A reason fit for operators and logs: connector messages are PII-free by contract,
    anything else is named by its type only."""
    if isinstance(exc, ConnectorError):
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return f"unexpected {type(exc).__name__}"


def backoff_ms(app: App, attempt: int) -> int:
    base = app.settings.retry_base_ms * 2 ** max(0, attempt - 1)
    capped: int = min(base, app.settings.retry_max_ms)
    return int(capped * random.uniform(0.8, 1.2))


def find_task(uow: UnitOfWork, request_id: str, store: str, phase: str) -> StoreTaskRow | None:
    tasks = uow.rows_of(StoreTaskRow, request_id)
    return next((t for t in tasks if t.store == store and t.phase == phase), None)


def ensure_task(uow: UnitOfWork, request_id: str, store: str, phase: str) -> StoreTaskRow:
    task = find_task(uow, request_id, store, phase)
    if task is None:
        task = StoreTaskRow(
            request_id=request_id, store=store, phase=phase, status="pending", attempts=0
        )
        uow.add(task)
    return task


def tasks_of(uow: UnitOfWork, request_id: str, phase: str) -> list[StoreTaskRow]:
    tasks = uow.rows_of(StoreTaskRow, request_id)
    return sorted((t for t in tasks if t.phase == phase), key=lambda t: t.store)


def _fail(uow: UnitOfWork, request: RequestRow, task: StoreTaskRow, reason: str) -> None:
    task.status = "failed"
    task.last_error = reason
    task.updated_at = utcnow()
    audit.record(
        uow.session,
        "store_task_failed",
        request_id=request.id,
        store=task.store,
        phase=task.phase,
        attempts=task.attempts,
        reason=reason,
    )
    if State.NEEDS_ATTENTION in TRANSITIONS[State(request.state)]:
        words = PHASE_WORDS[task.phase]
        advance(
            uow.session,
            request,
            State.NEEDS_ATTENTION,
            reason=f"{words} store {task.store!r} failed after {task.attempts} "
            f"attempt(s): {reason}",
        )


@dataclass
class _Call:
    """One request's store call in a batch: what to call, then what came back."""

    request_id: str
    attempt: int
    identity: Identity
    snapshot: RequestRow
    outcome: TaskOutcome | None = None
    error: str | None = None
    duration_ms: int = 0


def _call_store(
    connector: Connector, work: StoreWork, calls: Sequence[_Call], store: str, phase: str
) -> None:
    """Run `work` for the calls in one go and keep each call's outcome or error; if it
    fails as a whole, run each call alone, so one bad request cannot fail the others."""
    started = time.monotonic()
    try:
        outcomes = work(connector, [(c.identity, c.snapshot) for c in calls])
        if len(outcomes) != len(calls):
            raise RuntimeError(f"{len(outcomes)} outcome(s) for {len(calls)} call(s)")
    except Exception as exc:
        if len(calls) > 1:
            log.warning(
                "store_batch_failed",
                store=store,
                phase=phase,
                calls=len(calls),
                error=describe(exc),
            )
            for call in calls:
                _call_store(connector, work, [call], store, phase)
            return
        outcomes = [exc]
    # The time of a call made for several requests is divided evenly among them: each task
    # is charged its share, so the durations of a store's tasks add up to its busy time.
    share = round((time.monotonic() - started) * 1000 / len(calls))
    for call, outcome in zip(calls, outcomes, strict=True):
        call.duration_ms = share
        if isinstance(outcome, Exception):
            call.error = describe(outcome)
            log.warning(
                "store_task_errored",
                request_id=call.request_id,
                store=store,
                phase=phase,
                attempt=call.attempt,
                error=call.error,
            )
        else:
            call.outcome = outcome


def _by_id(uow: UnitOfWork, request_ids: Sequence[str]) -> dict[str, RequestRow]:
    return {r.id: r for r in lock_all(uow.session, request_ids)}


def _tasks(
    uow: UnitOfWork, request_ids: Sequence[str], store: str, phase: str
) -> dict[str, StoreTaskRow]:
    rows = uow.session.execute(
        select(StoreTaskRow).where(
            StoreTaskRow.request_id.in_(request_ids),
            StoreTaskRow.store == store,
            StoreTaskRow.phase == phase,
        )
    ).scalars()
    return {t.request_id: t for t in rows}


@dataclass
class _Located:
    """What locating found for the requests of a batch: the product ids that widen each
    identity (R11), and how many records each person has in the store at hand."""

    discovered: dict[str, dict[str, str]]
    records: dict[str, int]


def _located(app: App, uow: UnitOfWork, request_ids: Sequence[str], store: str) -> _Located:
    found = _Located({rid: {} for rid in request_ids}, {})
    rows = uow.session.execute(
        select(
            StoreTaskRow.request_id,
            StoreTaskRow.store,
            StoreTaskRow.result,
            StoreTaskRow.detail_enc,
        )
        .where(StoreTaskRow.request_id.in_(request_ids), StoreTaskRow.phase == "locate")
        .order_by(StoreTaskRow.store)
    ).all()
    for request_id, task_store, result, blob in rows:
        if task_store == store:
            found.records[request_id] = int((result or {}).get("records") or 0)
        if blob is None:
            continue
        detail = app.keys.ring.decrypt_json(blob, context=request_id.encode())
        if isinstance(detail, dict):
            found.discovered[request_id].update(detail.get("discovered_ids") or {})
    return found


def run_store_tasks(
    app: App,
    request_ids: Sequence[str],
    store: str,
    phase: str,
    work: StoreWork,
    on_all_done: Callable[[UnitOfWork, RequestRow], None],
) -> None:
    """One store's task for a batch of requests: claim them in one transaction, call the
    connector outside any transaction (for the whole batch at once if it reads in
    batches, else for each request), record every outcome and move on the requests
    whose last task this was in one more. A request that is unknown, not in
    the phase's state, or whose task is done or absent is skipped (a stray or repeated
    message). Raises `StoreRetry` with the shortest delay when a call failed and may be
    tried again: the message comes back, and the requests already recorded skip it.

    A person with more than `heavy_records` records in the store (as located) is served
    after the others of the batch, alone: the others are recorded and move on first, so
    a big request never holds back the small ones that travel with it."""
    calls, heavy = _claim(app, request_ids, store, phase)
    retries = [
        _call_and_record(app, part, store, phase, work, on_all_done)
        for part in ([calls] if calls else []) + [[call] for call in heavy]
    ]
    retry = min((r for r in retries if r is not None), key=lambda r: r.delay_ms, default=None)
    if retry is not None:
        raise retry


def _claim(
    app: App, request_ids: Sequence[str], store: str, phase: str
) -> tuple[list[_Call], list[_Call]]:
    """Count an attempt on each pending task of the batch, in one transaction: the calls
    to make, and apart the calls of heavy people, biggest last."""
    expected = PHASE_STATE[phase]
    ids = sorted(set(request_ids))
    with UnitOfWork(app) as uow:
        requests = _by_id(uow, ids)
        tasks = _tasks(uow, ids, store, phase)
        missing = [rid for rid in ids if rid not in requests]
        if missing and len(missing) == len(ids):
            raise UnknownRequest(f"no request with id {missing[0]!r}")
        ready = []
        for rid in ids:
            request, task = requests.get(rid), tasks.get(rid)
            if (
                request is None
                or task is None
                or task.status != "pending"
                or request.state != expected.value
            ):
                log.info(
                    "store_task_skipped",
                    request_id=rid,
                    store=store,
                    phase=phase,
                    status=task.status if task else "absent",
                    state=request.state if request else "unknown",
                )
                continue
            task.attempts += 1
            task.updated_at = utcnow()
            ready.append((request, task.attempts))
        if phase == "locate" or not ready:
            located = _Located({}, {})
        else:
            located = _located(app, uow, [r.id for r, _ in ready], store)
        calls = [
            _Call(
                request.id,
                attempt,
                identity_of(app, request, located.discovered.get(request.id)),
                request,
            )
            for request, attempt in ready
        ]
    records = located.records
    light = [c for c in calls if records.get(c.request_id, 0) <= app.settings.heavy_records]
    heavy = sorted(
        (c for c in calls if records.get(c.request_id, 0) > app.settings.heavy_records),
        key=lambda c: records[c.request_id],
    )
    return light, heavy


def _call_and_record(
    app: App,
    calls: list[_Call],
    store: str,
    phase: str,
    work: StoreWork,
    on_all_done: Callable[[UnitOfWork, RequestRow], None],
) -> StoreRetry | None:
    """Make the calls, then record their outcomes in one transaction; the retry to ask
    for, if a call failed and may be tried again."""
    expected = PHASE_STATE[phase]
    connector = app.connectors.get(store)
    # A store that reads in batches gets the whole batch in one call; any other store one
    # call at a time, as before (a loop failing half way would have the first calls made
    # twice).
    together = isinstance(connector, BatchReads)
    for group in [calls] if together else [[call] for call in calls]:
        for call in group:
            log.info(
                "store_task_started",
                request_id=call.request_id,
                store=store,
                phase=phase,
                attempt=call.attempt,
            )
        if connector is None:
            for call in group:
                call.outcome = TaskOutcome(
                    {}, failed_for_good=f"store {store!r} is not configured any more"
                )
        else:
            _call_store(connector, work, group, store, phase)
    retry: StoreRetry | None = None
    with UnitOfWork(app) as uow:
        called = [c.request_id for c in calls]
        requests = _by_id(uow, called)
        tasks = _tasks(uow, called, store, phase)
        finished: list[RequestRow] = []
        for call in calls:
            request, task = requests.get(call.request_id), tasks.get(call.request_id)
            if request is None or task is None or task.status != "pending":
                continue
            task.duration_ms = call.duration_ms
            delay = _record(app, uow, request, task, call)
            if delay is not None and (retry is None or delay < retry.delay_ms):
                retry = StoreRetry(call.error or "store failed", delay)
            if task.status == "done":
                finished.append(request)
        if finished:
            still = set(
                uow.session.execute(
                    select(StoreTaskRow.request_id).where(
                        StoreTaskRow.request_id.in_([r.id for r in finished]),
                        StoreTaskRow.phase == phase,
                        StoreTaskRow.status != "done",
                    )
                ).scalars()
            )
            for request in finished:
                if request.id not in still and request.state == expected.value:
                    on_all_done(uow, request)
    return retry


def _record(
    app: App, uow: UnitOfWork, request: RequestRow, task: StoreTaskRow, call: _Call
) -> int | None:
    """Record one call's outcome on its task; returns the retry delay if it is to be tried again."""
    store, phase = task.store, task.phase
    if call.error is not None:
        task.last_error = call.error
        task.updated_at = utcnow()
        if call.attempt >= app.settings.store_max_attempts:
            _fail(uow, request, task, call.error)
            return None
        audit.record(
            uow.session,
            "store_task_retried",
            request_id=request.id,
            store=store,
            phase=phase,
            attempt=call.attempt,
            reason=call.error,
        )
        return backoff_ms(app, call.attempt)
    outcome = call.outcome
    assert outcome is not None
    if outcome.failed_for_good:
        _fail(uow, request, task, outcome.failed_for_good)
        return None
    task.status = "done"
    task.result = outcome.result
    if outcome.detail is not None:
        task.detail_enc = app.keys.ring.encrypt_json(outcome.detail, context=request.id.encode())
    task.completed_at = task.updated_at = utcnow()
    audit.record(
        uow.session,
        f"store_{phase}_completed",
        request_id=request.id,
        store=store,
        **outcome.result,
    )
    for action, detail in outcome.events:
        audit.record(uow.session, action, request_id=request.id, store=store, **detail)
    log.info("store_task_completed", request_id=request.id, store=store, phase=phase)
    return None
