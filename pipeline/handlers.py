"""Which stage function handles which message: the table an in-process bus dispatches by.

The dramatiq actors in `workers/` call the same functions; this table lets the domain be
driven without a broker (unit tests, a single-process run) with identical semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline import actions, batch, intake, locate, notify, topology, verification

if TYPE_CHECKING:
    from pipeline.bootstrap import App

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
