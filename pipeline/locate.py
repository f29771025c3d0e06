"""Locate: one task per configured store finds the person's records (R11, R12, R13).

The request waits for every store; a store that fails is retried with backoff and then
marked as needing attention, never skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from connectors.base import Connector, LocateResult, locate_each
from pipeline import topology
from pipeline.db import RequestRow
from pipeline.outbox import as_ids
from pipeline.requests import advance, load
from pipeline.states import State
from pipeline.tasks import StoreCall, TaskOutcome, ensure_task, run_store_tasks
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App


def locate_request(app: App, request_id: str) -> None:
    """Fan out: a task row and a message per configured store."""
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.state == State.VERIFIED.value:
            advance(
                uow.session,
                request,
                State.LOCATING,
                reason=f"searching {len(app.connectors)} product store(s)",
            )
        elif request.state != State.LOCATING.value:
            return
        if not app.connectors:
            advance(uow.session, request, State.ACTING, reason="no product stores are configured")
            uow.send(f"{request_id}:act", topology.ACT_ACTOR, topology.ACT_QUEUE, request_id)
            return
        for store in sorted(app.connectors):
            ensure_task(uow, request_id, store, "locate")
            uow.send(
                f"{request_id}:locate:{store}",
                topology.LOCATE_STORE_ACTOR,
                topology.STORE_QUEUE,
                request_id,
                store,
            )


def _locate(connector: Connector, calls: Sequence[StoreCall]) -> list[TaskOutcome | Exception]:
    """Locate every request's person of the batch (in one read if the store can)."""
    return [_located(found) for found in locate_each(connector, [who for who, _ in calls])]


def _located(found: LocateResult) -> TaskOutcome:
    collections: dict[str, int] = {}
    for ref in found.records:
        collections[ref.collection] = collections.get(ref.collection, 0) + 1
    return TaskOutcome(
        result={
            "records": len(found.records),
            "erasable": len(found.erasable),
            "retained": len(found.retained),
            "collections": collections,
        },
        detail={
            "refs": [[r.collection, r.key, r.via, r.retained] for r in found.records],
            "discovered_ids": dict(found.discovered_ids),
        },
    )


def _all_located(uow: UnitOfWork, request: RequestRow) -> None:
    advance(uow.session, request, State.ACTING, reason="every product store was searched")
    uow.send(f"{request.id}:act", topology.ACT_ACTOR, topology.ACT_QUEUE, request.id)


def locate_store(app: App, request_ids: str | Sequence[str], store: str) -> None:
    run_store_tasks(app, as_ids(request_ids), store, "locate", _locate, _all_located)
