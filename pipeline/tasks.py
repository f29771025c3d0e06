"""Per-store tasks: claim, call the connector outside any transaction, record, fan in.

A store task row (request, store, phase) is the unit of idempotency: a redelivered
message finds it done and does nothing. Attempts are counted in the row, so the retry
budget survives a broker that forgets its messages. When the last task of a phase
finishes, the caller's `on_all_done` moves the request on, in the same commit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from connectors.base import Connector, ConnectorError, Identity
from pipeline import audit
from pipeline.db import RequestRow, StoreTaskRow, utcnow
from pipeline.errors import RetryLater, StoreFailed
from pipeline.requests import advance, identity_of, load
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
    return uow.session.execute(
        select(StoreTaskRow).where(
            StoreTaskRow.request_id == request_id,
            StoreTaskRow.store == store,
            StoreTaskRow.phase == phase,
        )
    ).scalar_one_or_none()


def ensure_task(uow: UnitOfWork, request_id: str, store: str, phase: str) -> StoreTaskRow:
    task = find_task(uow, request_id, store, phase)
    if task is None:
        task = StoreTaskRow(
            request_id=request_id, store=store, phase=phase, status="pending", attempts=0
        )
        uow.session.add(task)
        uow.session.flush()
    return task


def tasks_of(uow: UnitOfWork, request_id: str, phase: str) -> list[StoreTaskRow]:
    return list(
        uow.session.execute(
            select(StoreTaskRow)
            .where(StoreTaskRow.request_id == request_id, StoreTaskRow.phase == phase)
            .order_by(StoreTaskRow.store)
        ).scalars()
    )


def discovered_ids(app: App, uow: UnitOfWork, request_id: str) -> dict[str, str]:
    """Product ids that locating found, to widen the identity used for acting (R11)."""
    found: dict[str, str] = {}
    for task in tasks_of(uow, request_id, "locate"):
        if task.detail_enc is not None:
            detail = app.keys.ring.decrypt_json(task.detail_enc, context=request_id.encode())
            if isinstance(detail, dict):
                found.update(detail.get("discovered_ids") or {})
    return found


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


def run_store_task(
    app: App,
    request_id: str,
    store: str,
    phase: str,
    work: Callable[[Connector, Identity, RequestRow], TaskOutcome],
    on_all_done: Callable[[UnitOfWork, RequestRow], None],
) -> None:
    expected = PHASE_STATE[phase]
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        task = find_task(uow, request_id, store, phase)
        if task is None or task.status != "pending" or request.state != expected.value:
            # a stray or repeated message: the fan-out never asked for it, or it is done
            log.info(
                "store_task_skipped",
                request_id=request_id,
                store=store,
                phase=phase,
                status=task.status if task else "absent",
                state=request.state,
            )
            return
        task.attempts += 1
        task.updated_at = utcnow()
        attempt = task.attempts
        identity = identity_of(
            app, request, discovered_ids(app, uow, request_id) if phase != "locate" else None
        )
        snapshot = request
    log.info("store_task_started", request_id=request_id, store=store, phase=phase, attempt=attempt)
    connector = app.connectors.get(store)
    error: str | None = None
    outcome: TaskOutcome | None = None
    started = time.monotonic()
    if connector is None:
        outcome = TaskOutcome({}, failed_for_good=f"store {store!r} is not configured any more")
    else:
        try:
            outcome = work(connector, identity, snapshot)
        except Exception as exc:
            error = describe(exc)
            log.warning(
                "store_task_errored",
                request_id=request_id,
                store=store,
                phase=phase,
                attempt=attempt,
                error=error,
            )
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        task = find_task(uow, request_id, store, phase)
        if task is None or task.status != "pending":
            return
        task.duration_ms = round((time.monotonic() - started) * 1000)
        if error is not None:
            task.last_error = error
            task.updated_at = utcnow()
            if attempt >= app.settings.store_max_attempts:
                _fail(uow, request, task, error)
                return
            audit.record(
                uow.session,
                "store_task_retried",
                request_id=request_id,
                store=store,
                phase=phase,
                attempt=attempt,
                reason=error,
            )
        else:
            assert outcome is not None
            if outcome.failed_for_good:
                _fail(uow, request, task, outcome.failed_for_good)
                return
            task.status = "done"
            task.result = outcome.result
            if outcome.detail is not None:
                task.detail_enc = app.keys.ring.encrypt_json(
                    outcome.detail, context=request_id.encode()
                )
            task.completed_at = task.updated_at = utcnow()
            audit.record(
                uow.session,
                f"store_{phase}_completed",
                request_id=request_id,
                store=store,
                **outcome.result,
            )
            for action, detail in outcome.events:
                audit.record(uow.session, action, request_id=request_id, store=store, **detail)
            log.info("store_task_completed", request_id=request_id, store=store, phase=phase)
            pending = [t for t in tasks_of(uow, request_id, phase) if t.status != "done"]
            if not pending and request.state == expected.value:
                on_all_done(uow, request)
            return
    raise StoreRetry(error, backoff_ms(app, attempt))
