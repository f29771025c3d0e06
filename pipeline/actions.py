"""Act: do what the person asked, in every store that holds their data.

- access: each store's export is written encrypted as a part; `finish` assembles the
  archive (R14-R18).
- correct: each store applies the corrections it holds; before/after go to the audit as
  keyed hashes (R19, R20).
- erase: each store erases or retains with a legal basis; `finish` locates again and
  fails loudly if anything erasable remains (R21-R23).
- opt_out: the suppression list first (it takes effect at once), then each store's
  contact preference (R10, R26).
- concern: a case for the privacy team with its own due date (R27).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from connectors.base import (
    Capability,
    Connector,
    Correction,
    Identity,
    InvalidCorrection,
    LocateResult,
    StoreExport,
    export_each,
    locate_each,
)
from pipeline import archive, audit, batch, policy, topology
from pipeline.db import CaseRow, ExportRow, RequestRow, utcnow
from pipeline.errors import PermanentError, RetryLater
from pipeline.outbox import as_ids
from pipeline.requests import advance, load, payload_of
from pipeline.states import RequestType, State
from pipeline.suppression import suppress
from pipeline.tasks import (
    StoreCall,
    StoreWork,
    TaskOutcome,
    ensure_task,
    one_by_one,
    run_store_tasks,
    tasks_of,
)
from pipeline.uow import UnitOfWork

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()

CAPABILITY = {
    RequestType.ACCESS: Capability.EXPORT,
    RequestType.CORRECT: Capability.CORRECT,
    RequestType.ERASE: Capability.ERASE,
    RequestType.OPT_OUT: Capability.OPT_OUT,
}
# where a store holds the person's data but cannot do this, the request cannot complete
MUST_COVER = {RequestType.ACCESS, RequestType.ERASE}


def _to_notify(uow: UnitOfWork, request: RequestRow, reason: str) -> None:
    advance(uow.session, request, State.NOTIFYING, reason=reason)
    uow.send(f"{request.id}:notify", topology.NOTIFY_ACTOR, topology.NOTIFY_QUEUE, request.id)


def act_on_request(app: App, request_id: str) -> None:
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        kind = RequestType(request.type)
        if request.state == State.VERIFIED.value and kind is RequestType.CONCERN:
            advance(uow.session, request, State.ACTING, reason="nothing to search for a concern")
        if request.state != State.ACTING.value:
            return
        if kind is RequestType.CONCERN:
            _open_case(app, uow, request)
            _to_notify(uow, request, "a case was opened for the privacy team")
            return
        if kind is RequestType.OPT_OUT and suppress(uow.session, request.subject_hash, "opt_out"):
            audit.record(
                uow.session,
                "contact_suppressed",
                request_id=request_id,
                subject_hash=request.subject_hash,
                reason="opt_out",
            )
        capability = CAPABILITY[kind]
        holding = {
            t.store: t.result or {}
            for t in tasks_of(uow, request_id, "locate")
            if (t.result or {}).get("records", 0) > 0
        }
        chosen: list[str] = []
        for store, found in sorted(holding.items()):
            connector = app.connectors.get(store)
            if connector is not None and capability in connector.capabilities:
                chosen.append(store)
            elif kind in MUST_COVER:
                advance(
                    uow.session,
                    request,
                    State.NEEDS_ATTENTION,
                    reason=f"store {store!r} holds {found['records']} record(s) of the "
                    f"person but cannot {capability.value} them",
                )
                return
        if not chosen:
            uow.send(f"{request_id}:finish", topology.FINISH_ACTOR, topology.ACT_QUEUE, request_id)
            return
        for store in chosen:
            ensure_task(uow, request_id, store, "act")
            uow.send(
                f"{request_id}:act:{store}",
                topology.ACT_STORE_ACTOR,
                topology.STORE_QUEUE,
                request_id,
                store,
            )


def _open_case(app: App, uow: UnitOfWork, request: RequestRow) -> None:
    if uow.session.query(CaseRow).filter_by(request_id=request.id).first() is not None:
        return
    message = payload_of(app, request).get("concern", "")
    case_id = str(uuid.uuid4())
    due = min(request.due_at, request.received_at + policy.CONCERN_RESPONSE)
    uow.session.add(
        CaseRow(
            id=case_id,
            request_id=request.id,
            status="open",
            due_at=due,
            message_enc=app.keys.ring.encrypt(message.encode(), context=case_id.encode()),
        )
    )
    audit.record(
        uow.session, "case_opened", request_id=request.id, case_id=case_id, due_at=due.isoformat()
    )


def _act(app: App) -> StoreWork:
    """The access requests' exports in one read if the store can, each written as its
    part of the archive; every other request on its own."""
    act_alone = one_by_one(_act_on_one(app))

    def work(connector: Connector, calls: Sequence[StoreCall]) -> list[TaskOutcome | Exception]:
        access = [i for i, (_, r) in enumerate(calls) if r.type == RequestType.ACCESS.value]
        others = [i for i, (_, r) in enumerate(calls) if r.type != RequestType.ACCESS.value]
        outcomes: dict[int, TaskOutcome | Exception] = {}
        # The exports first: should the read fail as a whole (and the calls be run again
        # one by one), no correction or erasure of the batch has been made yet.
        exports = export_each(connector, [calls[i][0] for i in access])
        for i, export in zip(access, exports, strict=True):
            outcomes[i] = _write_part(app, calls[i][1], export)
        for i, outcome in zip(
            others, act_alone(connector, [calls[i] for i in others]), strict=True
        ):
            outcomes[i] = outcome
        return [outcomes[i] for i in range(len(calls))]

    return work


def _write_part(app: App, request: RequestRow, export: StoreExport) -> TaskOutcome | Exception:
    try:
        return TaskOutcome(result=archive.write_part(app, request.id, export))
    except Exception as exc:  # this request's part only: the others' stand
        return exc


def _act_on_one(app: App) -> Callable[[Connector, Identity, RequestRow], TaskOutcome]:
    def step(connector: Connector, identity: Identity, request: RequestRow) -> TaskOutcome:
        kind = RequestType(request.type)
        if kind is RequestType.CORRECT:
            wanted = tuple(Correction(f, v) for f, v in payload_of(app, request)["corrections"])
            try:
                done = connector.correct(identity, wanted)
            except InvalidCorrection as exc:  # told to the person (R20), not retried
                return TaskOutcome(result={"applied": [], "refused": str(exc)[:300]})
            blind = app.blind
            events = tuple(
                (
                    "record_corrected",
                    {
                        "collection": c.collection,
                        "field": c.field,
                        "before_hash": blind.of("value", c.before or ""),
                        "after_hash": blind.of("value", c.after),
                    },
                )
                for c in done.applied
            )
            return TaskOutcome(
                result={
                    "applied": sorted({c.field for c in done.applied}),
                    "changes": len(done.applied),
                    "not_held": list(done.not_held),
                },
                events=events,
            )
        if kind is RequestType.ERASE:
            erased = connector.erase(identity)
            retained: list[dict[str, Any]] = [
                {
                    "collection": r.collection,
                    "count": r.count,
                    "legal_basis": r.legal_basis,
                    "period": r.period,
                }
                for r in erased.retained
            ]
            events = tuple(("records_retained", r) for r in retained)
            return TaskOutcome(
                result={
                    "deleted": erased.deleted,
                    "anonymized": erased.anonymized,
                    "retained": retained,
                },
                events=events,
            )
        opted = connector.opt_out(identity)
        return TaskOutcome(result={"updated": opted.updated})

    return step


def _all_acted(uow: UnitOfWork, request: RequestRow) -> None:
    uow.send(f"{request.id}:finish", topology.FINISH_ACTOR, topology.ACT_QUEUE, request.id)


def act_on_store(app: App, request_ids: str | Sequence[str], store: str) -> None:
    run_store_tasks(app, as_ids(request_ids), store, "act", _act(app), _all_acted)


def _recheck(connector: Connector, calls: Sequence[StoreCall]) -> list[TaskOutcome | Exception]:
    """Locate again after the erasure (in one read if the store can): anything erasable
    left fails the task for good."""
    return [_rechecked(found) for found in locate_each(connector, [who for who, _ in calls])]


def _rechecked(found: LocateResult) -> TaskOutcome:
    remaining = len(found.erasable)
    if remaining:
        return TaskOutcome(
            {"remaining": remaining},
            failed_for_good=f"erasure left {remaining} record(s) that should be "
            f"gone; searching again still finds them",
        )
    return TaskOutcome({"remaining": 0, "retained": len(found.retained)})


def _all_rechecked(uow: UnitOfWork, request: RequestRow) -> None:
    uow.send(f"{request.id}:finish:verified", topology.FINISH_ACTOR, topology.ACT_QUEUE, request.id)


def recheck_store(app: App, request_ids: str | Sequence[str], store: str) -> None:
    run_store_tasks(app, as_ids(request_ids), store, "recheck", _recheck, _all_rechecked)


def finish_request(app: App, request_ids: str | Sequence[str]) -> None:
    """After every store acted: assemble, verify, or just move on to notify; for a batch
    of requests at once. What needs only the state database runs in one transaction for
    the batch; the access requests' archives are then built outside any transaction, and
    recorded together in one more."""
    ids = as_ids(request_ids)
    archives: dict[str, list[str]] = {}
    failed: RetryLater | PermanentError | None = None
    try:
        batch.for_each(app, ids, lambda one: _finish(app, one, archives), shared=True)
    except (RetryLater, PermanentError) as exc:
        failed = exc  # the others go on; raised once they are done
    if archives:
        meta = {name: c.metadata for name, c in app.connectors.items()}
        built = {
            request_id: (archive.assemble(app, request_id, parts, meta), len(parts))
            for request_id, parts in archives.items()
        }
        batch.for_each(
            app, list(built), lambda one: _record_export(app, one, *built[one]), shared=True
        )
    if failed is not None:
        raise failed


def _finish(app: App, request_id: str, archives: dict[str, list[str]]) -> None:
    """One request's finish, but for building its archive: that is left in `archives`
    (the stores whose parts go in), to be built outside the transaction."""
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.state != State.ACTING.value:
            return
        kind = RequestType(request.type)
        if kind is RequestType.ERASE:
            _finish_erasure(app, uow, request)
            return
        if kind is not RequestType.ACCESS:
            _to_notify(uow, request, f"every store has acted on the {kind.value} request")
            return
        if _has_export(uow, request_id):
            _to_notify(uow, request, "the export archive is ready")
            return
        archives[request_id] = [
            t.store for t in tasks_of(uow, request_id, "act") if t.status == "done"
        ]


def _has_export(uow: UnitOfWork, request_id: str) -> bool:
    return bool(uow.rows_of(ExportRow, request_id))


def _record_export(app: App, request_id: str, built: archive.BuiltArchive, stores: int) -> None:
    with UnitOfWork(app) as uow:
        request = load(uow.session, request_id)
        if request.state != State.ACTING.value:
            return
        if not _has_export(uow, request_id):
            now = utcnow()
            uow.add(
                ExportRow(
                    id=str(uuid.uuid4()),
                    request_id=request_id,
                    path=str(built.path),
                    size=built.size,
                    sha256=built.sha256,
                    created_at=now,
                    expires_at=now + timedelta(seconds=app.settings.download_ttl_seconds),
                )
            )
            audit.record(
                uow.session, "export_created", request_id=request_id, size=built.size, stores=stores
            )
        _to_notify(uow, request, "the export archive is ready")


def _finish_erasure(app: App, uow: UnitOfWork, request: RequestRow) -> None:
    erased = [t.store for t in tasks_of(uow, request.id, "act") if t.status == "done"]
    rechecks = tasks_of(uow, request.id, "recheck")
    if erased and not rechecks:
        for store in erased:
            ensure_task(uow, request.id, store, "recheck")
            uow.send(
                f"{request.id}:recheck:{store}",
                topology.RECHECK_STORE_ACTOR,
                topology.STORE_QUEUE,
                request.id,
                store,
            )
        return
    if any(t.status != "done" for t in rechecks):
        return
    if suppress(uow.session, request.subject_hash, "erasure"):
        audit.record(
            uow.session,
            "contact_suppressed",
            request_id=request.id,
            subject_hash=request.subject_hash,
            reason="erasure",
        )
    _to_notify(uow, request, "erasure done and verified by searching every store again")
