"""Batch messages: a stage message carries a list of ids, and the stage runs once per id.

The outbox groups the messages a stage asks for by actor (`outbox.grouped`), so
requests that move together travel together: one message, one delivery, one
acknowledgement for many requests. Each id still runs as if it had come alone, so
idempotency, fan-in and the audit trail do not change: in its own transaction, or, for
the short stages that touch only the state database (`shared`), in its own savepoint of
one transaction for the batch. What the ids ask for is published once, grouped, after
the last of them.

One id's failure does not hold back the others: they all run first. Then a retry
(a store or the mail server failed) brings the whole message back after its delay, and
the ids already done skip it; a permanent error (an id that names no request) ends the
message in the dead letters with its reason once nothing in it is left to retry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import structlog

from pipeline import uow
from pipeline.errors import PermanentError, RetryLater
from pipeline.outbox import as_ids

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()


def for_each(
    app: App, ids: str | Sequence[str], step: Callable[[str], None], *, shared: bool = False
) -> None:
    """Run `step` for every id, publish what they asked for, then raise what must be.

    `shared`: the steps run in one transaction, each in its own savepoint, with the
    batch's requests loaded and locked at once; for stages whose step is one unit of
    work that calls nothing outside the database (no store, no mail server), so the
    transaction stays short. Saves each id its own BEGIN, COMMIT, audit chain lock and
    outbox insert."""
    retry: RetryLater | None = None
    permanent: list[PermanentError] = []
    request_ids = as_ids(ids)
    with uow.collecting() as outgoing:
        try:
            with _scope(app, request_ids, shared) as scope:
                for request_id in request_ids:
                    try:
                        with scope.step() if scope is not None else nullcontext():
                            step(request_id)
                    except RetryLater as exc:
                        if retry is None or exc.delay_ms < retry.delay_ms:
                            retry = exc
                    except PermanentError as exc:
                        log.error(
                            "batch_item_failed", error=type(exc).__name__, reason=str(exc)[:300]
                        )
                        permanent.append(exc)
        finally:
            app.publisher.submit(outgoing)
    if retry is not None:
        raise retry
    if permanent:
        raise permanent[0]


@contextmanager
def _scope(app: App, request_ids: list[str], shared: bool) -> Iterator[uow.Shared | None]:
    if not shared:
        yield None
        return
    with uow.shared(app) as scope:
        scope.lock_requests(request_ids)
        yield scope
