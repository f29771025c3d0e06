"""A worker runs the short state-only stages right after the stage that asked for them
(`handlers.run`, `handlers.INLINE`): their messages never reach the broker, their outbox
rows are recorded as published once they ran, and a failure sends the message to the
broker after all, where it runs, retries or is dead-lettered as any other."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from pipeline import handlers, topology
from pipeline.db import OutboxRow
from pipeline.errors import PermanentError, RetryLater, UnknownRequest
from pipeline.intake import accept
from tests.conftest import make_app
from tests.integration.support import QuietBus, presigned, request_row, stores


@pytest.fixture
def app(state_url, tmp_path):
    application = make_app(state_url, tmp_path / "data", bus=QuietBus(), connectors=stores())
    yield application
    application.close()


def accepted(app, kind: str, *ids: str) -> None:
    for request_id in ids:
        accept(app, presigned(app, kind, request_id))
    app.bus.queue.clear()  # the verify messages: run by hand below


def queued(app) -> list[tuple[str, tuple]]:
    return [(e.actor, e.args, e.delay_ms) for e in app.bus.queue]


def outbox_of(app, actor: str) -> list[tuple[object, int]]:
    with app.sessions() as session:
        rows = session.execute(
            select(OutboxRow.published_at, OutboxRow.publish_count).where(OutboxRow.actor == actor)
        ).all()
    return [(published_at is not None, count) for published_at, count in rows]


def test_only_short_stages_on_the_state_database_alone_run_inline():
    assert handlers.INLINE <= handlers.SHARED  # no store, no mail server, one transaction


def test_verify_runs_locate_in_the_same_worker_and_only_the_store_messages_go_out(app):
    accepted(app, "access", "r-1", "r-2")
    handlers.run(app, topology.VERIFY_ACTOR, ["r-1", "r-2"])
    # locate_request ran here: its requests are locating, with its store messages queued
    assert [request_row(app, r).state for r in ("r-1", "r-2")] == ["locating"] * 2
    assert queued(app) == [(topology.LOCATE_STORE_ACTOR, (["r-1", "r-2"], "crm"), None)]
    # its outbox rows are recorded as published, once each: the relay leaves them alone
    assert outbox_of(app, topology.LOCATE_ACTOR) == [(True, 1), (True, 1)]


def test_the_whole_pipeline_through_run_reaches_done_with_fewer_messages(app):
    accepted(app, "erase", "r-1")
    handlers.run(app, topology.VERIFY_ACTOR, ["r-1"])
    seen = []
    while app.bus.queue:
        envelope = app.bus.queue.popleft()
        seen.append(envelope.actor)
        handlers.run(app, envelope.actor, *envelope.args)
    assert request_row(app, "r-1").state == "done"
    assert not set(seen) & handlers.INLINE  # every inline stage ran in its asker's worker
    assert topology.FINISH_ACTOR in seen and topology.SEND_EMAIL_ACTOR not in seen  # QuietBus
    for actor in handlers.INLINE:
        assert outbox_of(app, actor) == [(True, 1)]


def test_an_inline_stage_that_asks_for_a_retry_goes_to_the_broker_with_its_delay(app, monkeypatch):
    accepted(app, "access", "r-1")

    class Busy(RetryLater):
        delay_ms = 1500

    def busy(app, request_id):
        raise Busy("the state database is busy")

    monkeypatch.setitem(handlers.HANDLERS, topology.LOCATE_ACTOR, busy)
    handlers.run(app, topology.VERIFY_ACTOR, ["r-1"])  # the verify message itself succeeds
    assert request_row(app, "r-1").state == "verified"
    assert queued(app) == [(topology.LOCATE_ACTOR, (["r-1"],), 1500)]
    assert outbox_of(app, topology.LOCATE_ACTOR) == [(True, 1)]  # published now, not run
    monkeypatch.undo()
    envelope = app.bus.queue.popleft()
    handlers.run(app, envelope.actor, *envelope.args)  # the retry, as the broker delivers it
    assert request_row(app, "r-1").state == "locating"


def test_an_inline_stage_with_a_permanent_error_ends_on_the_broker_like_any_message(
    app, monkeypatch
):
    accepted(app, "access", "r-1")

    def gone(app, request_id):
        raise UnknownRequest(f"no request {request_id}")

    monkeypatch.setitem(handlers.HANDLERS, topology.LOCATE_ACTOR, gone)
    handlers.run(app, topology.VERIFY_ACTOR, ["r-1"])
    assert queued(app) == [(topology.LOCATE_ACTOR, (["r-1"],), None)]
    envelope = app.bus.queue.popleft()
    with pytest.raises(PermanentError):  # where the worker dead-letters it with its reason
        handlers.run(app, envelope.actor, *envelope.args)


def test_when_the_message_fails_what_its_other_ids_asked_for_still_goes_out(app):
    accepted(app, "access", "r-1")
    # r-unknown names no request: a permanent error, raised once r-1 has run
    with pytest.raises(PermanentError):
        handlers.run(app, topology.VERIFY_ACTOR, ["r-1", "r-unknown"])
    assert request_row(app, "r-1").state == "verified"
    # r-1's locate message was kept for this worker, which gives it to the broker instead
    assert queued(app) == [(topology.LOCATE_ACTOR, (["r-1"],), None)]
    assert outbox_of(app, topology.LOCATE_ACTOR) == [(True, 1)]


def test_handle_alone_runs_no_inline_stage(app):
    accepted(app, "access", "r-1")
    handlers.handle(app, topology.VERIFY_ACTOR, ["r-1"])
    assert queued(app) == [(topology.LOCATE_ACTOR, (["r-1"],), None)]
