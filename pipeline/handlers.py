"""Which stage function handles which message: the table an in-process bus dispatches by.

The dramatiq actors in `workers/` call the same functions; this table lets the domain be
driven without a broker (unit tests, a single-process run) with identical semantics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from pipeline import actions, batch, intake, locate, notify, outbox, topology, verification
from pipeline.errors import RetryLater

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()

HANDLERS: dict[str, Callable[..., Any]] = {
    topology.INTAKE_ACTOR: intake.accept,
    topology.VERIFY_ACTOR: verification.start,
    topology.LOCATE_ACTOR: locate.locate_request,
    topology.LOCATE_STORE_ACTOR: locate.locate_store,
    topology.ACT_ACTOR: actions.act_on_request,
    topology.ACT_STORE_ACTOR: actions.act_on_store,
    topology.RECHECK_STORE_ACTOR: actions.recheck_store,
    topology.FINISH_ACTOR: actions.finish_request,
    topology.NOTIFY_ACTOR: notify.notify_outcome,
    topology.SEND_EMAIL_ACTOR: notify.send_email,
}

STORE_ACTORS = {
    topology.LOCATE_STORE_ACTOR,
    topology.ACT_STORE_ACTOR,
    topology.RECHECK_STORE_ACTOR,
}

# stages that run a message's whole batch at once themselves, set-based: the store tasks,
# finishing (the archives built between two shared transactions) and the sending of
# emails (one claim and one record for all of them)
WHOLE_BATCH = STORE_ACTORS | {topology.FINISH_ACTOR, topology.SEND_EMAIL_ACTOR}

# stages whose step is one short unit of work on the state database alone: a batch of
# them runs in one transaction (`batch.for_each(shared=True)`)
SHARED = {
    topology.VERIFY_ACTOR,
    topology.LOCATE_ACTOR,
    topology.ACT_ACTOR,
    topology.NOTIFY_ACTOR,
}

# shared stages that also take on the requests waiting for them (`batch.Peers`): the
# first stage after intake, so the groups it forms travel together through the rest
PEERS: dict[str, batch.Peers] = {topology.VERIFY_ACTOR: verification.waiting}

# stages a worker runs right after the stage that asked for them, in the same thread,
# instead of through the broker (`run`): short steps on the state database alone that
# call no store and no mail server, each the next step of the same group of requests.
# Each saves a message: its publish, its wait in the publisher's window and for a
# consumer's poll, its delivery and acknowledgement.
INLINE = topology.INLINE_ACTORS


def handle(app: App, actor: str, *args: Any) -> Any:
    """Run one message. Stage messages carry a list of ids (`pipeline.batch`); the intake
    message carries one document."""
    stage = HANDLERS[actor]
    if actor == topology.INTAKE_ACTOR or actor in WHOLE_BATCH:
        return stage(app, *args)  # one document; or the whole batch at once
    first, *rest = args
    batch.for_each(
        app,
        first,
        lambda one: stage(app, one, *rest),
        shared=actor in SHARED,
        peers=PEERS.get(actor),
    )
    return None


def run(app: App, actor: str, *args: Any) -> None:
    """What a worker runs for one message: `handle`, then at once the `INLINE` stages it
    asked for (and theirs), grouped as the outbox would have sent them.

    The inline stages' outbox rows are recorded as published once they ran. If the
    message fails, what its successful ids asked for goes to the broker as it would have;
    if an inline stage fails, its message goes to the broker after all (after the delay
    a retry asked for), and runs, retries or ends in the dead letters there like any
    other (its ids already done skip it)."""
    failed: BaseException | None = None
    with outbox.keeping(INLINE) as kept:
        try:
            handle(app, actor, *args)
        except BaseException as exc:  # re-raised below, once the keeper is gone
            failed = exc
    if failed is not None:
        app.publisher.submit(kept)
        raise failed
    for message, members in outbox.grouped(kept):
        ids = set(members)
        envelopes = [e for e in kept if e.id in ids]
        try:
            run(app, message.actor, *message.args)
        except Exception as exc:
            log.warning("inline_stage_deferred", actor=message.actor, error=type(exc).__name__)
            delay = exc.delay_ms if isinstance(exc, RetryLater) else None
            app.publisher.submit([dataclasses.replace(e, delay_ms=delay) for e in envelopes])
        else:
            app.publisher.ran(envelopes)
