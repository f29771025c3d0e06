"""Connector health on the overview: per store, the last success and, over the last
hour and day, tasks done and failed and the share of store calls that errored; and the
throughput and failure charts."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from pipeline.dashboard.overview import flow, store_health
from pipeline.db import StoreTaskRow, TransitionRow, transaction, utcnow
from tests.integration.dashboard.conftest import stuck, submit


def health_of(app, store: str = "crm"):
    (found,) = [h for h in store_health(app) if h.store == store]
    return found


def test_a_store_that_keeps_failing_shows_as_failing_with_every_attempt_errored(
    app, bus, conns, viewer
):
    stuck(app, bus, conns)
    crm = health_of(app)
    hour = crm.windows["hour"]
    assert (hour.done, hour.failed, hour.errors, hour.attempts) == (0, 1, 2, 2)
    assert hour.error_rate == 1.0 and crm.failing and crm.last_success is None
    page = viewer.get("/").data.decode()
    assert 'id="store-health"' in page and 'data-store="crm"' in page
    assert '<span class="badge failed">failing</span>' in page
    assert "100% (2/2)" in page


def test_a_store_that_errored_once_then_answered_is_healthy_with_its_error_rate(
    app, bus, conns, viewer
):
    conns["crm"].fail_next(1)
    submit(app, "access", "r-flaky")
    bus.drain()
    crm = health_of(app)
    hour = crm.windows["hour"]
    assert hour.failed == 0 and hour.done >= 1 and hour.errors == 1
    assert hour.attempts == hour.done + 1  # one retry, every task done in the end
    assert crm.last_success is not None and not crm.failing
    assert crm.windows["day"] == hour
    page = viewer.get("/").data.decode()
    assert "failing</span>" not in page
    assert f"{100 / hour.attempts:.0f}% (1/{hour.attempts})" in page


def test_each_store_shows_the_latency_of_its_calls(app, bus, conns, viewer, dashboard):
    conns["crm"].delay_s = 0.12
    submit(app, "access", "r-slow")
    bus.drain()
    crm = health_of(app)
    hour = crm.windows["hour"]
    assert len(hour.latencies_ms) == hour.done  # one call per task: locate and act
    assert 120 <= hour.latency_ms(0.5) <= hour.latency_ms(0.95)
    with transaction(app.sessions) as session:
        durations = session.scalars(
            select(StoreTaskRow.duration_ms).where(StoreTaskRow.store == "crm")
        ).all()
    assert durations and all(d >= 120 for d in durations)
    row = viewer.get("/").data.decode().split('data-store="crm"')[1].split("</tr>")[0]
    assert f"{hour.latency_ms(0.5)} ms / {hour.latency_ms(0.95)} ms" in row
    metrics = dashboard.test_client().get("/metrics").data.decode()
    assert 'privacy_store_call_seconds{quantile="0.95",store="crm"}' in metrics


def test_the_hour_window_forgets_what_the_day_still_counts(app, bus, conns):
    stuck(app, bus, conns)
    with transaction(app.sessions) as session:
        session.execute(update(StoreTaskRow).values(updated_at=utcnow() - timedelta(hours=3)))
    crm = health_of(app)
    assert crm.windows["hour"].attempts == 0 and crm.windows["hour"].error_rate is None
    assert crm.windows["day"].failed == 1 and crm.windows["day"].errors == 2
    assert not crm.failing  # nothing errored in the last hour
    later = store_health(app, now=utcnow() + timedelta(days=2))
    assert later[0].windows["day"].attempts == 0


def test_no_store_tasks_yet_shows_a_plain_sentence(app, viewer):
    assert store_health(app) == []
    assert "No store has been asked anything yet." in viewer.get("/").data.decode()


def flow_of(app, **kw):
    return {w.name: w for w in flow(app, **kw)}


def test_throughput_and_failures_per_window_from_the_transitions(app, bus, conns, viewer):
    stuck(app, bus, conns)  # stops for a person
    submit(app, "opt_out", "r-done")
    bus.drain()
    windows = flow_of(app)
    hour, day = windows["hour"], windows["day"]
    assert (hour.finished, hour.stopped) == (1, 1) and hour.failure_rate == 0.5
    assert (day.finished, day.stopped) == (1, 1)
    assert len(hour.buckets) == 12 and len(day.buckets) == 24
    assert sum(b.finished + b.stopped for b in hour.buckets) == 2
    page = viewer.get("/").data.decode()
    assert 'id="flow-hour"' in page and 'id="flow-day"' in page
    assert "1 finished, 1 stopped for a person (failure rate 50%)" in page
    assert page.count("<svg") >= 3

    with transaction(app.sessions) as session:
        session.execute(
            update(TransitionRow)
            .where(TransitionRow.request_id == "r-stuck")
            .values(at=utcnow() - timedelta(hours=3))
        )
    windows = flow_of(app)
    assert (windows["hour"].finished, windows["hour"].stopped) == (1, 0)
    assert (windows["day"].finished, windows["day"].stopped) == (1, 1)
    assert windows["day"].buckets[-4].stopped == 1  # three hours ago
    assert flow_of(app, now=utcnow() + timedelta(days=2))["day"].failure_rate is None
