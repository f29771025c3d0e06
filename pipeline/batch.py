"""Batch messages: a stage message carries a list of ids, and the stage runs once per id.

The outbox groups the messages a stage asks for by actor (`outbox.grouped`), so
requests that move together travel together: one message, one delivery, one
acknowledgement for many requests. Each id still runs as if it had come alone, so
idempotency, fan-in and the audit trail do not change: in its own transaction, or, for
the short stages that touch only the state database (`shared`), in one transaction for
the batch whose writes reach the database together at its commit (and, should a step
fail, again with each step in its own savepoint, so that only that step is undone).
What the ids ask for is published once, grouped, after the last of them.

Under load a stage may also take on peers (`Peers`): requests that wait for this same
step, found in the state database rather than in the message, oldest first and skipping
rows another transaction holds. Their own messages, when they come, find the step done.
So a batch grows with the backlog: a busy pipeline moves requests in large groups,
while a quiet one moves each request as soon as it arrives; the groups then travel
together through the later stages.

One id's failure does not hold back the others: they all run first. Then a retry
(a store or the mail server failed) brings the whole message back after its delay, and
the ids already done skip it; a permanent error (an id that names no request) ends the
message in the dead letters with its reason once nothing in it is left to retry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog

from pipeline import uow
from pipeline.errors import PermanentError, RetryLater
from pipeline.outbox import BATCH_MAX, as_ids

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from pipeline.bootstrap import App
    from pipeline.db import RequestRow

log = structlog.get_logger()
T = TypeVar("T")
R = TypeVar("R")

# (app, session, the message's ids, how many more) -> requests waiting for the same
# step, locked for this transaction; never waits for a lock
Peers = Callable[["App", "Session", list[str], int], list["RequestRow"]]


def for_each(
    app: App,
    ids: str | Sequence[str],
    step: Callable[[str], None],
    *,
    shared: bool = False,
    peers: Peers | None = None,
) -> None:
    """Run `step` for every id, publish what they asked for, then raise what must be.

    `shared`: the steps run in one transaction, with the batch's requests loaded and
    locked at once; for stages whose step is one unit of work that calls nothing outside
    the database (no store, no mail server), so the transaction stays short. Saves each
    id its own BEGIN, COMMIT, audit chain lock and outbox insert. The steps first run
    side by side, so their writes go to the database together at the commit; if one
    fails, that transaction is undone and the batch runs again with each step in its own
    savepoint, undone alone. `peers` (shared only) adds the requests waiting for the
    same step, up to a message's worth of ids."""
    request_ids = as_ids(ids)
    failures = _Failures()
    with uow.collecting() as outgoing:
        try:
            if not shared:
                for request_id in request_ids:
                    failures.run(step, request_id)
            else:
                try:
                    _shared(app, request_ids, step, peers, failures, alone=False)
                except _Undo:
                    failures = _Failures()
                    _shared(app, request_ids, step, peers, failures, alone=True)
        finally:
            app.publisher.submit(outgoing)
    failures.raise_first()


class _Undo(Exception):
    """A step failed in a batch run without savepoints: undo it all, run again with them."""


class _Failures:
    """What the steps raised that must reach the broker once every id ran: the soonest
    retry wins over permanent errors."""

    def __init__(self) -> None:
        self.retry: RetryLater | None = None
        self.permanent: list[PermanentError] = []

    def run(
        self,
        step: Callable[[str], None],
        request_id: str,
        *,
        around: Callable[[], AbstractContextManager[None]] = nullcontext,
        undo: bool = False,
    ) -> None:
        """`around`: what the step runs inside (a savepoint); `undo`: a failure raises
        `_Undo` instead of being kept."""
        try:
            with around():
                step(request_id)
        except RetryLater as exc:
            if undo:
                raise _Undo from exc
            if self.retry is None or exc.delay_ms < self.retry.delay_ms:
                self.retry = exc
        except PermanentError as exc:
            if undo:
                raise _Undo from exc
            log.error("batch_item_failed", error=type(exc).__name__, reason=str(exc)[:300])
            self.permanent.append(exc)

    def raise_first(self) -> None:
        if self.retry is not None:
            raise self.retry
        if self.permanent:
            raise self.permanent[0]


def _shared(
    app: App,
    request_ids: list[str],
    step: Callable[[str], None],
    peers: Peers | None,
    failures: _Failures,
    *,
    alone: bool,
) -> None:
    """One transaction for the batch; `alone`: each step in its own savepoint."""
    with uow.shared(app) as scope:
        scope.lock_requests(request_ids)
        room = BATCH_MAX - len(request_ids)
        taken = (
            peers(app, scope.session, request_ids, room) if peers is not None and room > 0 else []
        )
        scope.hold(taken)
        for request_id in request_ids + [r.id for r in taken]:
            if alone:
                failures.run(step, request_id, around=scope.step)
            else:
                failures.run(step, request_id, undo=True)


class GroupCommit(Generic[T, R]):
    """Calls from several threads at once, run as one call on the list of their items:
    a group commit. The first caller to find nobody running leads: it takes the items
    waiting (its own first, up to `limit`), runs them together, hands each caller its
    result, and steps down; callers that came meanwhile wait, and the next of them leads
    the next group. Alone, a caller runs its item at once, waiting for nothing.

    `run` returns one result per item, in order: a value, or an exception that the item's
    caller raises. An exception out of `run` itself fails the whole group.
    """

    def __init__(self, run: Callable[[list[T]], list[R | Exception]], *, limit: int) -> None:
        self._run = run
        self.limit = limit
        self._cond = threading.Condition()
        self._waiting: list[_Slot[T, R]] = []
        self._busy = False

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._cond:
            self._waiting.append(slot)
            while self._busy and not slot.done:
                self._cond.wait()
            if not slot.done:
                self._busy = True
                self._waiting.remove(slot)
                group = [slot, *self._waiting[: self.limit - 1]]
                del self._waiting[: self.limit - 1]
        if not slot.done:
            self._lead(group)
        return slot.outcome()

    def _lead(self, group: list[_Slot[T, R]]) -> None:
        results: list[R | Exception] = []
        try:
            results = self._run([s.item for s in group])
        except Exception as exc:  # the group's transaction failed: every caller hears it
            results = [exc] * len(group)
        except BaseException:  # the leader is interrupted (a time limit): the others retry
            results = [RuntimeError("the thread running this group was interrupted")] * len(group)
            raise
        finally:  # results and the next leader at once: a member never leads again
            with self._cond:
                for s, result in zip(group, results, strict=True):
                    s.result, s.done = result, True
                self._busy = False
                self._cond.notify_all()


class _Slot(Generic[T, R]):
    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.result: R | Exception | None = None

    def outcome(self) -> R:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result  # type: ignore[return-value]
