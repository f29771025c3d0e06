"""Batch messages (pipeline.batch, outbox.grouped, outbox.Publisher): requests that move
together share one message per stage, each id still runs alone and idempotently, one
id's failure holds back nobody, and nothing is marked published before it is sent."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from pipeline import batch, outbox, topology, uow
from pipeline.db import NotificationRow, OutboxRow, RequestRow, TransitionRow
from pipeline.errors import UnknownRequest
from pipeline.intake import accept
from pipeline.outbox import Envelope, Publisher
from pipeline.tasks import StoreRetry
from pipeline.uow import UnitOfWork
from tests.conftest import InlineBus, make_app, state_database
from tests.integration.support import QuietBus, document, presigned, request_row, stores


def envelope(n: int, actor: str = topology.LOCATE_ACTOR, *extra: str) -> Envelope:
    return Envelope(id=f"o-{n}", actor=actor, queue="q", args=(f"r-{n}", *extra))


# -- grouping -----------------------------------------------------------------------------


def test_envelopes_for_one_actor_and_the_same_other_arguments_become_one_message():
    envelopes = [
        envelope(1),
        envelope(2, topology.LOCATE_STORE_ACTOR, "crm"),
        envelope(3),
        envelope(4, topology.LOCATE_STORE_ACTOR, "billing"),
        envelope(5, topology.LOCATE_STORE_ACTOR, "crm"),
    ]
    groups = [(m.actor, m.args, members) for m, members in outbox.grouped(envelopes)]
    assert groups == [
        (topology.LOCATE_ACTOR, (["r-1", "r-3"],), ["o-1", "o-3"]),
        (topology.LOCATE_STORE_ACTOR, (["r-2", "r-5"], "crm"), ["o-2", "o-5"]),
        (topology.LOCATE_STORE_ACTOR, (["r-4"], "billing"), ["o-4"]),
    ]


def test_a_group_is_split_at_the_batch_limit_keeping_order():
    messages = outbox.grouped([envelope(n) for n in range(7)], limit=3)
    assert [m.args[0] for m, _ in messages] == [
        ["r-0", "r-1", "r-2"],
        ["r-3", "r-4", "r-5"],
        ["r-6"],
    ]
    assert [m.id for m, _ in messages] == ["o-0", "o-3", "o-6"]


def test_a_message_may_carry_one_id_or_a_list_and_nothing_else():
    assert outbox.as_ids("r-1") == ["r-1"]
    assert outbox.as_ids(["r-1", "r-2"]) == ["r-1", "r-2"]
    for bad in ({"id": "r-1"}, ["r-1", 2], 7):
        with pytest.raises(UnknownRequest.__mro__[1]):  # PermanentError
            outbox.as_ids(bad)  # type: ignore[arg-type]


# -- the outbox rows ----------------------------------------------------------------------


@pytest.fixture
def app(state_url, tmp_path):
    bus = QuietBus()  # emails stay queued as notification rows
    application = make_app(state_url, tmp_path / "data", bus=bus, connectors=stores())
    yield application
    application.close()


def outbox_rows(app) -> int:
    with app.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(OutboxRow)) or 0)


def test_a_key_asked_twice_in_one_transaction_or_again_later_is_one_row_and_one_envelope(app):
    with UnitOfWork(app) as first:
        first.send("k-1", topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, "r-1")
        first.send("k-1", topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, "r-1")
        first.send("k-2", topology.ACT_ACTOR, topology.ACT_QUEUE, "r-2")
    with UnitOfWork(app) as again:
        again.send("k-1", topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, "r-1")
    assert outbox_rows(app) == 2
    delivered = [(e.actor, e.args) for e in app.bus.queue]
    assert delivered == [(topology.LOCATE_ACTOR, (["r-1"],)), (topology.ACT_ACTOR, (["r-2"],))]


def test_a_transaction_that_rolls_back_asks_for_nothing(app):
    with pytest.raises(RuntimeError), UnitOfWork(app) as work:
        work.send("k-1", topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, "r-1")
        raise RuntimeError("the stage failed")
    assert outbox_rows(app) == 0 and not app.bus.queue


# -- a batch through the pipeline ---------------------------------------------------------


def test_requests_accepted_together_travel_together_and_all_finish(app):
    kinds = ["opt_out", "access", "erase", "opt_out", "correct"]
    with uow.collecting() as outgoing:
        for n, kind in enumerate(kinds):
            assert accept(app, presigned(app, kind, f"r-{n}")).status == "accepted"
    app.publisher.submit(outgoing)
    (verify,) = [e for e in app.bus.queue if e.actor == topology.VERIFY_ACTOR]
    assert verify.args == ([f"r-{n}" for n in range(5)],)
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(5)] == ["done"] * 5
    by_actor = {}
    for e in app.bus.delivered:
        by_actor.setdefault(e.actor, []).append(e.args[0])
    # five requests, yet one message per stage they shared (the verify messages without
    # ids after it are finishing requests making room for others: none waits here)
    assert [ids for ids in by_actor[topology.VERIFY_ACTOR] if ids] == [[f"r-{n}" for n in range(5)]]
    assert by_actor[topology.LOCATE_ACTOR] == [[f"r-{n}" for n in range(5)]]
    assert sum(len(ids) for ids in by_actor[topology.NOTIFY_ACTOR]) == 5


def test_every_stage_message_redelivered_as_a_batch_changes_nothing_more(app):
    app.bus.redeliver = True  # each batch message runs twice
    with uow.collecting() as outgoing:
        for n, kind in enumerate(["access", "erase", "opt_out"]):
            accept(app, presigned(app, kind, f"r-{n}"))
    app.publisher.submit(outgoing)
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(3)] == ["done"] * 3
    sends = [e for e in app.bus.delivered if e.actor == topology.SEND_EMAIL_ACTOR]
    notes = [i for e in sends for i in e.args[0]]
    assert len(notes) == len(set(notes)) == 6  # an acknowledgement and an outcome each


def test_an_unknown_id_in_a_batch_holds_back_nobody_and_fails_the_message_after(app):
    accept(app, presigned(app, "opt_out", "r-1"))
    app.bus.queue.clear()
    seen: list[str] = []

    def step(request_id: str) -> None:
        seen.append(request_id)
        if request_id == "r-missing":
            raise UnknownRequest(f"no request with id {request_id!r}")

    with pytest.raises(UnknownRequest):
        batch.for_each(app, ["r-missing", "r-1", "r-2"], step)
    assert seen == ["r-missing", "r-1", "r-2"]


def test_a_retry_in_a_batch_comes_back_with_the_shortest_delay_after_the_others_ran(app):
    seen: list[str] = []

    def step(request_id: str) -> None:
        seen.append(request_id)
        if request_id == "r-slow":
            raise StoreRetry("store 'crm' is down", 4000)
        if request_id == "r-slower":
            raise StoreRetry("store 'crm' is down", 9000)
        if request_id == "r-missing":
            raise UnknownRequest("no request")

    with pytest.raises(StoreRetry) as raised:
        batch.for_each(app, ["r-slower", "r-missing", "r-slow", "r-ok"], step)
    assert raised.value.delay_ms == 4000  # the retry wins over the permanent error
    assert seen == ["r-slower", "r-missing", "r-slow", "r-ok"]


def test_what_the_ids_of_a_batch_ask_for_is_published_once_after_the_last(app):
    published: list[Envelope] = []

    class Counting(InlineBus):
        def publish(self, envelope: Envelope) -> None:
            published.append(envelope)

    app.__dict__["bus"] = Counting(app=app)

    def step(request_id: str) -> None:
        with UnitOfWork(app) as work:
            work.send(f"{request_id}:act", topology.ACT_ACTOR, topology.ACT_QUEUE, request_id)
        assert not published  # nothing goes out while the batch runs

    batch.for_each(app, ["r-1", "r-2", "r-3"], step)
    assert [(e.actor, e.args) for e in published] == [
        (topology.ACT_ACTOR, (["r-1", "r-2", "r-3"],))
    ]
    with app.sessions() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.published_at.is_(None))
            )
            == 0
        )


# -- the coalescing publisher -------------------------------------------------------------


class Recording:
    def __init__(self) -> None:
        self.messages: list[Envelope] = []
        self.lock = threading.Lock()

    def publish(self, envelope: Envelope) -> None:
        with self.lock:
            self.messages.append(envelope)

    def outstanding(self) -> int | None:
        return None


def committed(app, keys: list[str]) -> list[Envelope]:
    with app.sessions.begin() as session:
        return outbox.add_all(
            session,
            [outbox.Wanted(k, topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, (k,)) for k in keys],
        )


def published_at(app) -> dict[str, bool]:
    with app.sessions() as session:
        rows = session.execute(select(OutboxRow.key, OutboxRow.published_at)).all()
    return {key: at is not None for key, at in rows}


def eventually(check, seconds: float = 15.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_after_a_quiet_spell_a_message_goes_out_at_once(app):
    bus = Recording()
    publisher = Publisher(app.sessions, lambda: bus, window=timedelta(seconds=30))
    publisher.submit(committed(app, ["r-1"]))
    assert [m.args for m in bus.messages] == [(["r-1"],)]
    assert eventually(lambda: published_at(app) == {"r-1": True})  # recorded a moment later


def test_publishes_are_recorded_later_together_in_one_transaction(app):
    from sqlalchemy import event

    bus = Recording()
    publisher = Publisher(app.sessions, lambda: bus, window=timedelta(milliseconds=1))
    assert publisher.marks is not None
    commits = []

    def count(conn) -> None:
        commits.append(1)

    event.listen(app.engine, "commit", count)
    try:
        for n in range(5):  # five commits, each publishing at once (the window is tiny)
            publisher.submit(committed(app, [f"r-{n}"]))
            time.sleep(0.005)
        assert eventually(lambda: len(bus.messages) == 5)
        before = len(commits)
        assert eventually(lambda: all(published_at(app).values()) and len(published_at(app)) == 5)
    finally:
        event.remove(app.engine, "commit", count)
    # the five marks went in far fewer transactions than five (one per MARK_INTERVAL)
    assert len(commits) - before <= 2
    with app.sessions() as session:
        rows = session.execute(select(OutboxRow.key, OutboxRow.publish_count)).all()
    assert sorted(rows) == [(f"r-{n}", 1) for n in range(5)]


def test_a_publish_whose_record_is_lost_is_published_again_by_the_relay(app):
    bus = Recording()
    publisher = Publisher(app.sessions, lambda: bus, window=timedelta(seconds=30))
    assert publisher.marks is not None
    publisher.marks.interval = 3600  # the process dies before it records the publish
    publisher.submit(committed(app, ["r-1"]))
    assert [m.args for m in bus.messages] == [(["r-1"],)]
    assert published_at(app) == {"r-1": False}
    relay = Recording()
    assert outbox.publish_pending(app.sessions, relay, older_than=timedelta(0)) == 1
    assert [m.args for m in relay.messages] == [(["r-1"],)]  # a repeat, never a loss
    assert published_at(app) == {"r-1": True}


def test_messages_arriving_within_the_window_wait_and_go_together(app):
    bus = Recording()
    publisher = Publisher(app.sessions, lambda: bus, window=timedelta(seconds=2))
    publisher.submit(committed(app, ["r-1"]))  # at once
    for key in ("r-2", "r-3", "r-4"):
        publisher.submit(committed(app, [key]))  # within the window: they wait
    assert [m.args for m in bus.messages] == [(["r-1"],)]
    waiting = published_at(app)
    assert not (waiting["r-2"] or waiting["r-3"] or waiting["r-4"])
    for _ in range(300):  # the flusher publishes, then the rows are marked in a commit
        if len(bus.messages) == 2 and all(published_at(app).values()):
            break
        time.sleep(0.05)
    assert [m.args for m in bus.messages] == [(["r-1"],), (["r-2", "r-3", "r-4"],)]
    assert all(published_at(app).values())  # marked once sent


def test_verify_messages_wait_in_their_own_window_while_other_stages_go_on(app):
    def verify(keys: list[str]) -> list[Envelope]:
        with app.sessions.begin() as session:
            return outbox.add_all(
                session,
                [
                    outbox.Wanted(k, topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, (k,))
                    for k in keys
                ],
            )

    bus = Recording()
    publisher = Publisher(
        app.sessions,
        lambda: bus,
        window=timedelta(milliseconds=1),
        windows={topology.VERIFY_ACTOR: timedelta(seconds=2)},
    )
    publisher.submit(verify(["v-1"]))  # after a quiet spell: at once
    publisher.submit(verify(["v-2"]))  # within verify's window: waits
    publisher.submit(verify(["v-3"]))
    time.sleep(0.05)
    publisher.submit(committed(app, ["l-1"]))  # another stage: its own, short window
    assert eventually(lambda: len(bus.messages) == 2, seconds=1.5)
    assert [(m.actor, m.args) for m in bus.messages] == [
        (topology.VERIFY_ACTOR, (["v-1"],)),
        (topology.LOCATE_ACTOR, (["l-1"],)),
    ]
    assert eventually(lambda: len(bus.messages) == 3)  # verify's window closes: together
    assert bus.messages[2].args == (["v-2", "v-3"],)


def test_pressure_stretches_windows_only_while_messages_wait_past_the_target():
    pressure = outbox.Pressure(target_ms=100, most=2.5, weight=0.5)
    assert pressure.stretch() == 1.0  # nothing seen yet
    pressure.observe(40)
    assert pressure.stretch() == 1.0  # time to spare: the windows stay as set
    for _ in range(20):
        pressure.observe(200)
    assert pressure.stretch() == pytest.approx(2.0, rel=0.01)  # in proportion to the wait
    for _ in range(20):
        pressure.observe(5000)
    assert pressure.stretch() == 2.5  # never past `most`
    for _ in range(20):
        pressure.observe(-50)  # a clock behind the broker's: no wait, not a negative one
    assert pressure.lag_ms >= 0 and pressure.stretch() == 1.0


def test_under_pressure_a_message_waits_for_the_stretched_window(app):
    pressure = outbox.Pressure(target_ms=100, most=6.0)
    bus = Recording()
    publisher = Publisher(
        app.sessions, lambda: bus, window=timedelta(milliseconds=300), pressure=pressure
    )
    publisher.submit(committed(app, ["r-1"]))  # after a quiet spell: at once
    time.sleep(0.4)  # past the window as set
    publisher.submit(committed(app, ["r-2"]))
    assert [m.args for m in bus.messages] == [(["r-1"],), (["r-2"],)]  # no pressure: at once
    pressure.lag_ms = 10_000.0  # the workers fall behind: windows of 1.8 s
    time.sleep(0.4)
    publisher.submit(committed(app, ["r-3"]))  # 400 ms after the last publish: waits
    assert len(bus.messages) == 2
    assert not published_at(app)["r-3"]
    assert eventually(lambda: len(bus.messages) == 3, seconds=3)
    assert bus.messages[2].args == (["r-3"],)


def test_a_worker_tells_the_publisher_how_long_stage_messages_waited(app):
    import dramatiq

    from workers import actors

    actors.install(app)
    try:
        lag = actors._QueueLag()
        now_ms = time.time() * 1000

        def message(actor: str, waited_ms: float, **options) -> dramatiq.broker.MessageProxy:
            sent = dramatiq.Message(
                queue_name="q",
                actor_name=actor,
                args=(["r-1"],),
                kwargs={},
                options=options,
                message_timestamp=int(now_ms - waited_ms),
            )
            return dramatiq.broker.MessageProxy(sent)

        lag.before_process_message(actors._broker, message(topology.INTAKE_ACTOR, 9000))
        lag.before_process_message(actors._broker, message(topology.LOCATE_ACTOR, 9000, eta=1))
        assert app.publisher.pressure.lag_ms == 0  # intake goes first; a retry was due later
        lag.before_process_message(actors._broker, message(topology.LOCATE_ACTOR, 2000))
        assert app.publisher.pressure.lag_ms >= 0.2 * 2000 - 50  # one message's worth
    finally:
        actors._app = None


def test_flush_sends_what_waits_and_a_broker_that_fails_leaves_it_to_the_relay(app):
    class Down(Recording):
        def publish(self, envelope: Envelope) -> None:
            raise ConnectionError("broker down")

    bus: Recording = Recording()
    publisher = Publisher(app.sessions, lambda: bus, window=timedelta(seconds=30))
    publisher.submit(committed(app, ["r-1"]))
    publisher.submit(committed(app, ["r-2"]))
    bus = Down()
    publisher.flush()
    assert published_at(app) == {"r-1": True, "r-2": False}  # the relay will send r-2
    assert outbox.publish_pending(app.sessions, Recording(), older_than=timedelta(0)) == 1


def test_one_store_call_of_a_batch_failing_retries_only_that_request(app):
    from pipeline.db import StoreTaskRow

    with uow.collecting() as outgoing:
        for n in range(3):
            accept(app, presigned(app, "opt_out", f"r-{n}"))
    app.publisher.submit(outgoing)
    app.connectors["crm"].fail_next(1)  # the first call of the batch: r-0's
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(3)] == ["done"] * 3
    with app.sessions() as session:
        attempts = dict(
            session.execute(
                select(StoreTaskRow.request_id, StoreTaskRow.attempts).where(
                    StoreTaskRow.phase == "locate"
                )
            ).all()
        )
    assert attempts == {"r-0": 2, "r-1": 1, "r-2": 1}
    locates = [e for e in app.bus.delivered if e.actor == topology.LOCATE_STORE_ACTOR]
    assert [e.args for e in locates] == [(["r-0", "r-1", "r-2"], "crm")] * 2  # back once


def test_in_a_shared_batch_a_step_that_fails_half_way_is_undone_alone(app):
    from pipeline import audit
    from pipeline.db import AuditRow
    from pipeline.errors import InvalidTransition
    from pipeline.requests import advance, load
    from pipeline.states import State

    for n in range(3):
        accept(app, presigned(app, "opt_out", f"r-{n}"))
    app.bus.queue.clear()

    def step(request_id: str) -> None:
        with UnitOfWork(app) as work:
            request = load(work.session, request_id)
            advance(work.session, request, State.VERIFIED, reason="test")
            work.send(
                f"{request_id}:next", topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, request_id
            )
            audit.record(work.session, "test_step", request_id=request_id)
            if request_id == "r-1":  # writes done, then a permanent error
                raise InvalidTransition("r-1 cannot go on")

    with pytest.raises(InvalidTransition):
        batch.for_each(app, ["r-0", "r-1", "r-2"], step, shared=True)
    assert [request_row(app, f"r-{n}").state for n in range(3)] == [
        "verified",
        "received",  # undone alone
        "verified",
    ]
    with app.sessions() as session:
        steps = session.scalars(
            select(AuditRow.request_id).where(AuditRow.action == "test_step")
        ).all()
        moved = session.scalars(
            select(TransitionRow.request_id).where(TransitionRow.reason == "test")
        ).all()
        keys = session.scalars(select(OutboxRow.key).where(OutboxRow.key.like("%:next"))).all()
        report = audit.verify_chain(session)
    assert sorted(steps) == sorted(moved) == ["r-0", "r-2"]
    assert sorted(keys) == ["r-0:next", "r-2:next"]
    assert report.intact
    (message,) = [e for e in app.bus.queue if e.actor == topology.LOCATE_ACTOR]
    assert message.args == (["r-0", "r-2"],)


def test_a_shared_batch_locks_its_requests_once_and_commits_once(app):
    from sqlalchemy import event

    for n in range(4):
        accept(app, presigned(app, "opt_out", f"r-{n}"))
    app.bus.queue.clear()
    statements: list[str] = []
    inserts: list[str] = []

    def count(conn, cursor, statement, *rest):
        statements.append(statement.split()[0].upper())
        if statement.upper().startswith("INSERT"):
            inserts.append(statement.split()[2].strip('"').lower())

    event.listen(app.engine, "before_cursor_execute", count)
    try:
        from pipeline import handlers

        handlers.handle(app, topology.VERIFY_ACTOR, [f"r-{n}" for n in range(4)])
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    assert [request_row(app, f"r-{n}").state for n in range(4)] == ["verified"] * 4
    # one SELECT of the four requests, not one each; one outbox INSERT for the batch
    with app.sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(OutboxRow)
                .where(OutboxRow.actor == topology.LOCATE_ACTOR)
            )
            == 4
        )
    # the steps ran side by side: no savepoint each, and the four requests' new states
    # went out as one UPDATE (executemany) at the commit; the other UPDATE marks the
    # outbox rows published
    assert statements.count("SAVEPOINT") == 0
    assert statements.count("UPDATE") == 2
    selects_of_requests = [s for s in statements if s == "SELECT"]
    assert len(selects_of_requests) < 4 * 2  # far fewer than a transaction per request


def drain_until(app, actor: str) -> list[str]:
    """Run the pipeline until only `actor`'s messages are left; their ids, not run."""
    from pipeline import handlers

    held: list[str] = []
    while app.bus.queue:
        envelope = app.bus.queue.popleft()
        if envelope.actor == actor:
            held.extend(outbox.as_ids(envelope.args[0]))
        else:
            handlers.handle(app, envelope.actor, *envelope.args)
    return held


@pytest.mark.parametrize("size", [2, 8])
def test_a_shared_batch_reads_its_notifications_and_exports_once_whatever_its_size(app, size):
    from sqlalchemy import event

    from pipeline import handlers

    with uow.collecting() as outgoing:
        for n in range(size):
            accept(app, presigned(app, "access", f"r-{n}"))
    app.publisher.submit(outgoing)
    ids = drain_until(app, topology.NOTIFY_ACTOR)
    assert sorted(ids) == [f"r-{n}" for n in range(size)]
    reads: list[str] = []

    def count(conn, cursor, statement, *rest):
        flat = " ".join(statement.split())
        if flat.startswith("SELECT"):
            reads.extend(t for t in ("notifications", "exports") if f"FROM {t}" in flat)

    event.listen(app.engine, "before_cursor_execute", count)
    try:
        handlers.handle(app, topology.NOTIFY_ACTOR, ids)
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    assert sorted(reads) == ["exports", "notifications"]  # once for the batch, any size
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(size)] == ["done"] * size
    with app.sessions() as session:
        outcomes = session.scalar(
            select(func.count())
            .select_from(NotificationRow)
            .where(NotificationRow.event == "outcome")
        )
    assert outcomes == size


def test_a_step_undone_in_a_batch_leaves_no_stale_rows_in_the_batch_reads(app):
    from pipeline.requests import load, notify_person

    for n in range(2):
        accept(app, presigned(app, "opt_out", f"r-{n}"))
    app.bus.queue.clear()
    with uow.shared(app) as scope:
        scope.lock_requests(["r-0", "r-1"])
        with pytest.raises(UnknownRequest), scope.step(), UnitOfWork(app) as work:
            request = load(work.session, "r-1")
            notify_person(app, work, request, "extra", "acknowledgement", {"request_id": "x"})
            assert [n.event for n in work.owned(NotificationRow, "r-1")] == [
                "acknowledgement",
                "extra",
            ]
            raise UnknownRequest("undone after it queued its mail")
        # the batch's reads forgot the undone row: read again, they hold what is there
        assert [n.event for n in scope.owned(NotificationRow, "r-1")] == ["acknowledgement"]
        with scope.step(), UnitOfWork(app) as work:
            request = load(work.session, "r-1")
            assert notify_person(app, work, request, "extra", "acknowledgement", {}) is not None
    with app.sessions() as session:
        extra = session.scalars(
            select(NotificationRow.request_id).where(NotificationRow.event == "extra")
        ).all()
    assert extra == ["r-1"]  # queued once: the undone one is gone, the second one stays


# -- peers: a stage takes on the requests waiting for it ----------------------------------


def test_a_verify_message_takes_on_the_requests_waiting_for_it_oldest_first(app):
    from pipeline import handlers

    for n in range(4):
        accept(app, presigned(app, "access", f"r-{n}"))  # proven by a signed assertion
    accept(app, document("access", "r-4"))  # must confirm a mailed link first
    accept(app, document("opt_out", "r-5"))  # needs no proof
    app.bus.queue.clear()

    handlers.handle(app, topology.VERIFY_ACTOR, ["r-2"])

    states = {f"r-{n}": request_row(app, f"r-{n}").state for n in range(6)}
    assert states == {
        "r-0": "verified",
        "r-1": "verified",
        "r-2": "verified",
        "r-3": "verified",
        "r-4": "received",  # waits for the person: nobody takes it on
        "r-5": "verified",
    }
    # the message's own id first, then the others oldest first, moving on together
    (locate,) = [e for e in app.bus.queue if e.actor == topology.LOCATE_ACTOR]
    assert locate.args == (["r-2", "r-0", "r-1", "r-3", "r-5"],)

    # their own messages come later and find the step done
    app.bus.queue.clear()
    handlers.handle(app, topology.VERIFY_ACTOR, ["r-0", "r-1", "r-3", "r-5"])
    assert not [e for e in app.bus.queue if e.actor == topology.LOCATE_ACTOR]
    with app.sessions() as session:
        moved = session.scalars(
            select(TransitionRow.request_id).where(TransitionRow.to_state == "verified")
        ).all()
    assert sorted(moved) == ["r-0", "r-1", "r-2", "r-3", "r-5"]  # once each


def test_peers_fill_a_message_up_to_the_batch_limit(app, monkeypatch):
    from pipeline import handlers

    monkeypatch.setattr(batch, "BATCH_MAX", 3)
    for n in range(5):
        accept(app, presigned(app, "opt_out", f"r-{n}"))
    app.bus.queue.clear()
    handlers.handle(app, topology.VERIFY_ACTOR, ["r-4"])
    assert [request_row(app, f"r-{n}").state for n in range(5)] == [
        "verified",
        "verified",
        "received",
        "received",
        "verified",
    ]


def test_a_peer_another_transaction_holds_is_skipped_not_waited_for(tmp_path):
    """PostgreSQL's row locks (SQLite runs one writing transaction at a time)."""
    from pipeline import handlers

    with state_database("postgresql", tmp_path) as url:
        app = make_app(url, tmp_path / "data", bus=QuietBus(), connectors=stores())
        try:
            _skipped_while_held(app, handlers)
        finally:
            app.close()


def _skipped_while_held(app, handlers):
    for n in range(3):
        accept(app, presigned(app, "opt_out", f"r-{n}"))
    with app.sessions() as other:
        other.execute(
            select(RequestRow).where(RequestRow.id == "r-1").with_for_update()
        ).scalar_one()
        handlers.handle(app, topology.VERIFY_ACTOR, ["r-0"])  # does not block on r-1
        assert request_row(app, "r-1").state == "received"
        assert request_row(app, "r-2").state == "verified"
        other.rollback()
    handlers.handle(app, topology.VERIFY_ACTOR, ["r-1"])
    assert request_row(app, "r-1").state == "verified"


# -- admission: under a burst, requests finish group by group --------------------------


@pytest.fixture
def admitting(state_url, tmp_path):
    """An app letting `admit_max` requests past verification, with `count` pre-verified
    opt-outs r-0, r-1, ... accepted and their own verify messages dropped."""
    made = []

    def make(admit_max: int, count: int):
        app = make_app(
            state_url, tmp_path / "data", bus=QuietBus(), connectors=stores(), admit_max=admit_max
        )
        made.append(app)
        for n in range(count):
            accept(app, presigned(app, "opt_out", f"r-{n}"))
        app.bus.queue.clear()
        return app

    yield make
    for app in made:
        app.close()


def test_beyond_the_admission_room_requests_wait_oldest_first_and_finishing_ones_admit_them(
    admitting,
):
    from pipeline import handlers

    app = admitting(admit_max=2, count=5)  # their own verify messages lost: only admission
    handlers.handle(app, topology.VERIFY_ACTOR, [])  # takes on what there is room for
    states = [request_row(app, f"r-{n}").state for n in range(5)]
    assert states == ["verified", "verified", "received", "received", "received"]
    app.bus.drain()  # each finishing batch admits the next waiting ones, oldest first
    assert [request_row(app, f"r-{n}").state for n in range(5)] == ["done"] * 5
    with app.sessions() as session:
        verified = session.execute(
            select(TransitionRow.request_id)
            .where(TransitionRow.to_state == "verified")
            .order_by(TransitionRow.id)
        ).scalars()
        assert list(verified) == [f"r-{n}" for n in range(5)]


def test_a_request_with_its_own_message_also_waits_for_room(admitting):
    from pipeline import handlers

    app = admitting(admit_max=1, count=2)
    handlers.handle(app, topology.VERIFY_ACTOR, ["r-0"])
    handlers.handle(app, topology.VERIFY_ACTOR, ["r-1"])  # no room: left waiting
    assert [request_row(app, f"r-{n}").state for n in range(2)] == ["verified", "received"]
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(2)] == ["done", "done"]


def test_stalled_requests_hold_no_room_and_the_reconciler_admits_who_waits(admitting):
    from datetime import timedelta

    from sqlalchemy import update

    from pipeline import handlers, reconcile
    from pipeline.db import utcnow

    app = admitting(admit_max=1, count=2)
    with app.sessions.begin() as session:  # r-0 in flight, moving: no room for r-1
        session.execute(update(RequestRow).where(RequestRow.id == "r-0").values(state="acting"))
    later = utcnow() + timedelta(seconds=10)
    assert reconcile.admit_waiting(app, later) == 0
    assert reconcile.admit_waiting(app, utcnow()) == 0  # r-1 has not waited long yet
    stalled = utcnow() - timedelta(seconds=app.settings.stall_seconds + 1)
    with app.sessions.begin() as session:  # r-0 stalls: the reconciler's business now
        session.execute(update(RequestRow).where(RequestRow.id == "r-0").values(updated_at=stalled))
    assert reconcile.admit_waiting(app, later) == 1
    (message,) = [e for e in app.bus.queue if e.actor == topology.VERIFY_ACTOR]
    assert message.args == ([],)
    app.bus.queue.clear()
    handlers.handle(app, topology.VERIFY_ACTOR, *message.args)
    assert request_row(app, "r-1").state == "verified"


# -- group commit: intake documents accepted at the same moment share a transaction -------


def test_calls_that_come_while_a_group_runs_form_the_next_group_each_with_its_result():
    started, release = threading.Event(), threading.Event()
    groups: list[list[int]] = []

    def run(items: list[int]) -> list[int | Exception]:
        groups.append(list(items))
        if len(groups) == 1:
            started.set()
            assert release.wait(10)
        return [ValueError(f"bad {i}") if i == 13 else i * 10 for i in items]

    commit: batch.GroupCommit[int, int] = batch.GroupCommit(run, limit=50)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = commit.submit(i)
        except ValueError as exc:
            results[i] = str(exc)

    first = threading.Thread(target=call, args=(1,))
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=call, args=(i,)) for i in (2, 13, 4)]
    for t in others:
        t.start()
    while len(commit._waiting) < 3:  # all three wait behind the running group
        time.sleep(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert groups[0] == [1]
    assert sorted(groups[1]) == [2, 4, 13] and len(groups) == 2  # one group for the three
    assert results == {1: 10, 2: 20, 13: "bad 13", 4: 40}  # each caller gets its own


def test_a_group_that_fails_as_a_whole_fails_every_caller_and_the_next_one_runs():
    def run(items: list[str]) -> list[str | Exception]:
        if "boom" in items:
            raise RuntimeError("the transaction failed")
        return [i.upper() for i in items]

    commit: batch.GroupCommit[str, str] = batch.GroupCommit(run, limit=50)
    with pytest.raises(RuntimeError, match="transaction failed"):
        commit.submit("boom")
    assert commit.submit("fine") == "FINE"  # nobody is left leading


def test_documents_stored_as_a_group_share_one_transaction_and_one_verify_message(app):
    from pipeline import intake

    old = presigned(app, "access", "r-old")
    accept(app, old)
    app.bus.queue.clear()
    items = []
    for doc in [
        presigned(app, "access", "r-0"),
        presigned(app, "opt_out", "r-1"),
        old,  # the same document again: a duplicate
        presigned(app, "erase", "r-old"),  # another document under a used id: refused
        presigned(app, "correct", "r-2"),
    ]:
        items.append(_valid(app, doc))
    statements: list[str] = []
    inserts: list[str] = []

    def count(conn, cursor, statement, *rest):
        statements.append(statement.split()[0].upper())
        if statement.upper().startswith("INSERT"):
            inserts.append(statement.split()[2].strip('"').lower())

    from sqlalchemy import event

    event.listen(app.engine, "before_cursor_execute", count)
    try:
        results = intake._store_all(app, items)
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    assert [getattr(r, "status", type(r).__name__) for r in results] == [
        "accepted",
        "accepted",
        "duplicate",
        "ConflictingRequest",
        "accepted",
    ]
    # one transaction for the group, one more marking its message published (SQLite
    # shows its BEGIN IMMEDIATE; PostgreSQL's BEGIN is not a statement of its own)
    assert statements.count("BEGIN") <= 2
    # what is stored under the group's ids and its people's open requests: two reads for
    # the whole group, whatever its size (and the audit head)
    assert statements.count("SELECT") == 3
    # the group's three new requests in one statement, and so each table it writes
    assert inserts.count("requests") == 1
    assert len(inserts) == len(set(inserts)), inserts
    (verify,) = [e for e in app.bus.queue if e.actor == topology.VERIFY_ACTOR]
    assert verify.args == (["r-0", "r-1", "r-2"],)
    assert [request_row(app, f"r-{n}").state for n in range(3)] == ["received"] * 3
    with app.sessions() as session:
        acks = session.scalars(
            select(NotificationRow.request_id).where(NotificationRow.event == "acknowledgement")
        ).all()
    assert sorted(acks) == ["r-0", "r-1", "r-2", "r-old"]


def test_a_group_links_each_request_to_the_oldest_open_one_of_its_person_as_if_alone(app):
    from datetime import UTC, datetime

    from pipeline import intake

    def received(hours: int) -> dict[str, str]:
        return {"received_at": (datetime.now(UTC) - timedelta(hours=hours)).isoformat()}

    # one person's three documents in one group, each received earlier than the last:
    # each is linked to the oldest request of theirs open when it is stored
    items = [_valid(app, presigned(app, "access", f"r-{h}", **received(h))) for h in (1, 2, 3)]
    results = intake._store_all(app, items)
    assert [r.status for r in results] == ["accepted"] * 3
    assert [request_row(app, f"r-{h}").linked_to for h in (1, 2, 3)] == [None, "r-1", "r-2"]


def test_documents_accepted_by_threads_at_once_are_each_stored_once(app):
    docs = [presigned(app, "opt_out", f"r-{n}") for n in range(12)] * 2  # each twice
    outcomes: list[str] = []

    def deliver(doc):
        outcomes.append(accept(app, doc).status)

    threads = [threading.Thread(target=deliver, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["accepted"] * 12 + ["duplicate"] * 12
    with app.sessions() as session:
        assert session.scalar(select(func.count()).select_from(RequestRow)) == 12


def _valid(app, doc):
    """A document through the contract, as `intake.accept` hands it to the group."""
    import hashlib
    from datetime import UTC, datetime

    from pipeline import contract, intake

    now = datetime.now(UTC)
    parsed = contract.parse(doc, max_bytes=app.settings.max_document_bytes, now=now)
    system = contract.check_assertion(parsed, app.keys.intake_keys, now)
    fingerprint = app.blind.of(
        "document", hashlib.sha256(contract.content_fingerprint(parsed.raw)).hexdigest()
    )
    subject_hash = app.blind.email(parsed.subject.email)
    return intake._Valid(parsed, fingerprint, subject_hash, f"assertion:{system}", now)
