"""Recovery from the state database (invariant 3): nothing the broker loses stalls a
request, and emails stuck in the outbox are sent again, once per stall period."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from pipeline import outbox, reconcile, topology
from pipeline.db import NotificationRow, OutboxRow, RequestRow, StoreTaskRow, utcnow
from pipeline.intake import accept
from pipeline.outbox import Envelope
from tests.conftest import make_app
from tests.integration.support import QuietBus, document, presigned, request_row, stores


class BrokenBus(QuietBus):
    """A broker that is down: every publish fails."""

    def publish(self, envelope: Envelope) -> None:
        raise ConnectionError("broker unreachable")


class LosingBus(QuietBus):
    """Loses the first message for one actor, as a Redis restarted empty would."""

    def __init__(self, lose: str):
        super().__init__()
        self.lose = lose
        self.lost: list[Envelope] = []

    def publish(self, envelope: Envelope) -> None:
        if envelope.actor == self.lose and not self.lost:
            self.lost.append(envelope)
            return
        super().publish(envelope)


def build(state_url, tmp_path, bus):
    return make_app(state_url, tmp_path / "data", bus=bus, connectors=stores())


def later(app, extra: int = 1) -> datetime:
    return utcnow() + timedelta(seconds=app.settings.stall_seconds + extra)


def asserted(app, kind: str, request_id: str) -> dict:
    return presigned(app, kind, request_id)


# -- (a) committed but never published -----------------------------------------------


def test_an_outbox_row_whose_publish_failed_is_published_by_a_later_tick(state_url, tmp_path):
    app = build(state_url, tmp_path, BrokenBus())
    try:
        assert accept(app, document("opt_out", "r-1")).status == "accepted"  # commit survives
        with app.sessions() as session:
            rows = session.execute(select(OutboxRow)).scalars().all()
        assert {r.actor for r in rows} == {topology.VERIFY_ACTOR, topology.SEND_EMAIL_ACTOR}
        assert all(r.published_at is None for r in rows)

        working = QuietBus(app=app)
        app.__dict__["bus"] = working
        assert reconcile.tick(app).published == 0  # too young: its own commit may still publish
        with app.sessions.begin() as session:
            session.execute(update(OutboxRow).values(created_at=utcnow() - timedelta(seconds=6)))
        report = reconcile.tick(app)
        assert report.published == 2
        assert [e.actor for e in working.queue] == [topology.VERIFY_ACTOR]
        with app.sessions() as session:
            rows = session.execute(select(OutboxRow)).scalars().all()
        assert all(r.published_at is not None and r.publish_count == 1 for r in rows)
        assert reconcile.tick(app).published == 0  # published once, never again
        working.drain()
        assert request_row(app, "r-1").state == "done"
    finally:
        app.close()


def test_publish_pending_only_takes_rows_older_than_asked(state_url, tmp_path):
    app = build(state_url, tmp_path, BrokenBus())
    try:
        accept(app, document("opt_out", "r-1"))
        bus = QuietBus(app=app)
        assert outbox.publish_pending(app.sessions, bus, older_than=timedelta(minutes=1)) == 0
        assert outbox.publish_pending(app.sessions, bus, older_than=timedelta(0)) == 2
    finally:
        app.close()


# -- (b) a message lost by the broker --------------------------------------------------

LOST = [
    topology.VERIFY_ACTOR,
    topology.LOCATE_ACTOR,
    topology.LOCATE_STORE_ACTOR,
    topology.ACT_ACTOR,
    topology.ACT_STORE_ACTOR,
    topology.FINISH_ACTOR,
    topology.RECHECK_STORE_ACTOR,
    topology.NOTIFY_ACTOR,
]


@pytest.mark.parametrize("lost", LOST)
def test_a_request_whose_message_was_lost_is_rekicked_and_completes(state_url, tmp_path, lost):
    bus = LosingBus(lost)
    app = build(state_url, tmp_path, bus)
    try:
        accept(app, asserted(app, "erase", "r-lost"))
        bus.drain()
        assert bus.lost, f"the flow never sent {lost}"
        stalled = request_row(app, "r-lost").state
        assert stalled != "done"

        assert reconcile.tick(app).rekicked == 0  # not stalled yet: still within the period
        report = reconcile.tick(app, now=later(app))
        assert report.rekicked >= 1
        assert bus.lost[0].actor in {e.actor for e in bus.queue}
        assert all(e.args[0] == "r-lost" for e in bus.queue)
        bus.drain()
        assert request_row(app, "r-lost").state == "done"
        assert [p["id"] for p in app.connectors["crm"].people] == ["c2"]
    finally:
        app.close()


def test_a_rekicked_request_is_not_rekicked_again_within_the_stall_period(state_url, tmp_path):
    bus = LosingBus(topology.LOCATE_ACTOR)
    app = build(state_url, tmp_path, bus)
    try:
        accept(app, asserted(app, "erase", "r-1"))
        bus.drain()
        moment = later(app)
        assert reconcile.rekick_stalled(app, moment) == 1
        assert reconcile.rekick_stalled(app, moment + timedelta(seconds=1)) == 0
    finally:
        app.close()


def test_a_store_task_that_moved_recently_is_left_to_its_retries(state_url, tmp_path):
    bus = LosingBus(topology.LOCATE_STORE_ACTOR)
    app = build(state_url, tmp_path, bus)
    try:
        accept(app, asserted(app, "erase", "r-1"))
        bus.drain()
        moment = later(app)
        with app.sessions.begin() as session:
            session.execute(update(StoreTaskRow).values(updated_at=moment))
        assert reconcile.rekick_stalled(app, moment) == 0
    finally:
        app.close()


@pytest.mark.parametrize("state", ["awaiting_verification", "needs_attention", "done"])
def test_requests_waiting_for_a_person_or_an_operator_are_never_rekicked(
    state_url, tmp_path, state
):
    bus = QuietBus()
    app = build(state_url, tmp_path, bus)
    try:
        accept(app, document("access", "r-1"))
        bus.queue.clear()
        with app.sessions.begin() as session:
            session.execute(update(RequestRow).values(state=state))
        assert reconcile.rekick_stalled(app, later(app)) == 0
        assert not bus.queue
    finally:
        app.close()


# -- (c) emails stuck in the outbox -----------------------------------------------------


def test_a_pending_email_older_than_the_stall_period_is_resent_and_a_sent_one_never(
    state_url, tmp_path
):
    bus = QuietBus()
    app = build(state_url, tmp_path, bus)
    try:
        accept(app, document("access", "r-pending"))
        accept(app, document("access", "r-sent", subject={"email": "x@example.org"}))
        with app.sessions.begin() as session:
            notes = {n.request_id: n for n in session.execute(select(NotificationRow)).scalars()}
            notes["r-sent"].status = "sent"
        pending_id = notes["r-pending"].id
        bus.delivered.clear()
        bus.queue.clear()  # an idle broker: nothing else is waiting

        assert reconcile.resend_stuck_emails(app, utcnow()) == 0  # not stuck yet
        moment = later(app)
        assert reconcile.resend_stuck_emails(app, moment) == 1
        assert [e.args for e in bus.delivered] == [(pending_id,)]
        assert reconcile.resend_stuck_emails(app, moment + timedelta(seconds=1)) == 0
        assert reconcile.resend_stuck_emails(app, later(app, 2 * app.settings.stall_seconds)) == 1
        assert all(e.args == (pending_id,) for e in bus.delivered)
    finally:
        app.close()


# -- (d) what a stalled request waits for ----------------------------------------------


def req(state: str, kind: str = "erase") -> RequestRow:
    return RequestRow(id="r-1", type=kind, state=state)


def task(store: str, phase: str, status: str = "pending") -> StoreTaskRow:
    return StoreTaskRow(request_id="r-1", store=store, phase=phase, status=status)


def plan(request: RequestRow, tasks: list[StoreTaskRow]) -> list[tuple[str, str, tuple]]:
    return [(e.actor, e.queue, e.args) for e in reconcile.next_messages(request, tasks)]


R = ("r-1",)


@pytest.mark.parametrize(
    ("row", "tasks", "expected"),
    [
        (req("received"), [], [(topology.VERIFY_ACTOR, topology.VERIFY_QUEUE, R)]),
        (req("verified"), [], [(topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, R)]),
        (req("verified", "concern"), [], [(topology.ACT_ACTOR, topology.ACT_QUEUE, R)]),
        (req("locating"), [], [(topology.LOCATE_ACTOR, topology.LOCATE_QUEUE, R)]),
        (
            req("locating"),
            [task("a", "locate", "done"), task("b", "locate")],
            [(topology.LOCATE_STORE_ACTOR, topology.STORE_QUEUE, ("r-1", "b"))],
        ),
        (
            req("acting"),
            [task("a", "locate", "done")],
            [(topology.ACT_ACTOR, topology.ACT_QUEUE, R)],
        ),
        (
            req("acting"),
            [task("a", "act"), task("b", "act", "done"), task("c", "act")],
            [
                (topology.ACT_STORE_ACTOR, topology.STORE_QUEUE, ("r-1", "a")),
                (topology.ACT_STORE_ACTOR, topology.STORE_QUEUE, ("r-1", "c")),
            ],
        ),
        (
            req("acting"),
            [task("a", "act", "done"), task("a", "recheck")],
            [(topology.RECHECK_STORE_ACTOR, topology.STORE_QUEUE, ("r-1", "a"))],
        ),
        (
            req("acting"),
            [task("a", "act", "done")],
            [(topology.FINISH_ACTOR, topology.ACT_QUEUE, R)],
        ),
        (
            req("acting"),
            [task("a", "act", "done"), task("a", "recheck", "done")],
            [(topology.FINISH_ACTOR, topology.ACT_QUEUE, R)],
        ),
        (req("notifying"), [], [(topology.NOTIFY_ACTOR, topology.NOTIFY_QUEUE, R)]),
        (req("awaiting_verification"), [], []),
        (req("needs_attention"), [task("a", "act", "failed")], []),
        (req("done"), [], []),
        (req("expired"), [], []),
        (req("cancelled"), [], []),
    ],
    ids=[
        "received",
        "verified",
        "verified concern",
        "locating before fan-out",
        "locating with a pending store",
        "acting before fan-out",
        "acting with pending stores",
        "rechecking",
        "acted",
        "rechecked",
        "notifying",
        "awaiting verification",
        "needs attention",
        "done",
        "expired",
        "cancelled",
    ],
)
def test_next_messages_names_what_each_state_waits_for(row, tasks, expected):
    assert plan(row, tasks) == expected


class BacklogBus(LosingBus):
    """A broker that still holds other people's messages (a busy queue)."""

    backlog = 500

    def outstanding(self) -> int:
        return self.backlog


def test_with_a_backlog_a_quiet_request_waits_its_turn_instead_of_being_resent(state_url, tmp_path):
    """No retry storm: behind a long queue an idle request is not stalled, so nothing is
    re-sent until the broker drains, or until a much longer patience runs out."""
    bus = BacklogBus(topology.LOCATE_ACTOR)
    app = build(state_url, tmp_path, bus)
    try:
        accept(app, asserted(app, "erase", "r-queued"))
        bus.drain()
        stall = timedelta(seconds=app.settings.stall_seconds)
        assert reconcile.rekick_stalled(app, later(app)) == 0
        assert reconcile.rekick_stalled(app, utcnow() + stall * 5) == 0
        patience = stall * reconcile.BACKLOG_PATIENCE + timedelta(seconds=1)
        assert reconcile.rekick_stalled(app, utcnow() + patience) == 1
        bus.backlog = 0
        assert reconcile.rekick_stalled(app, utcnow() + patience + stall * 2) == 1
    finally:
        app.close()
