"""Prometheus metrics at `/metrics`, computed at scrape time from the state database and
the broker, in a registry of the dashboard's own (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from pipeline.dashboard.overview import counts, store_health, store_names
from pipeline.dashboard.queues import QueueReader
from pipeline.db import StoreTaskRow, TransitionRow, utcnow

if TYPE_CHECKING:
    from pipeline.bootstrap import App


STAGE_WINDOW = timedelta(hours=1)
STAGE_SAMPLE = 20_000  # transitions read at most per scrape, the latest first


class PipelineCollector(Collector):
    def __init__(self, app: App, queues: QueueReader):
        self.app = app
        self.queues = queues

    def _stage_durations(self) -> Metric:
        """How long requests stayed in each state, for states left within the last hour:
        from the request's transition before (entering the state) to the one that left
        it. Each transition's predecessor is looked up on the request's transitions (the
        `request_id` index), so only the last hour's transitions are read, at most
        STAGE_SAMPLE of them, the latest first."""
        family = SummaryMetricFamily(
            "privacy_stage_duration_seconds",
            "Time requests spent in each stage, for stages left in the last hour",
            labels=["stage"],
        )
        since = utcnow() - STAGE_WINDOW
        left, before = TransitionRow, aliased(TransitionRow)
        entered = (
            select(before.at)
            .where(before.request_id == left.request_id, before.id < left.id)
            .order_by(before.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        with self.app.sessions() as session:
            rows = session.execute(
                select(left.from_state, left.at, entered)
                .where(left.at >= since, left.from_state.is_not(None))
                .order_by(left.at.desc())
                .limit(STAGE_SAMPLE)
            ).all()
        totals: dict[str, list[float]] = {}
        for from_state, at, start in rows:
            if from_state is not None and start is not None:
                totals.setdefault(from_state, []).append((at - start).total_seconds())
        for stage, seconds in sorted(totals.items()):
            family.add_metric([stage], count_value=len(seconds), sum_value=sum(seconds))
        return family

    def collect(self) -> Iterator[Metric]:
        requests = GaugeMetricFamily(
            "privacy_requests", "Requests by state and type", labels=["state", "type"]
        )
        summary = counts(self.app, attention_limit=0)
        for (state, kind), count in sorted(summary.by_state_type.items()):
            requests.add_metric([state, kind], count)
        yield requests
        yield self._stage_durations()
        yield GaugeMetricFamily(
            "privacy_requests_at_risk", "Open requests due within 7 days", value=summary.at_risk
        )
        yield GaugeMetricFamily(
            "privacy_requests_overdue", "Open requests past their due date", value=summary.overdue
        )

        with self.app.sessions() as session:
            # per store on the (store, status, ...) index: no read of every task
            failures = {
                store: session.scalar(
                    select(func.count()).where(
                        StoreTaskRow.store == store, StoreTaskRow.status == "failed"
                    )
                )
                for store in store_names(session)
            }
        failed = GaugeMetricFamily(
            "privacy_store_tasks_failed",
            "Store tasks that failed after every retry, per store",
            labels=["store"],
        )
        for store, n in sorted(failures.items()):
            failed.add_metric([store], n or 0)
        yield failed

        latency = GaugeMetricFamily(
            "privacy_store_call_seconds",
            "Time of the last store call of the store tasks touched in the last hour, per store",
            labels=["store", "quantile"],
        )
        error_rate = GaugeMetricFamily(
            "privacy_store_attempt_error_ratio",
            "Share of store calls that errored in the last hour, per store",
            labels=["store"],
        )
        for health in store_health(self.app):
            hour = health.windows["hour"]
            for quantile in (0.5, 0.95):
                value = hour.latency_ms(quantile)
                if value is not None:
                    latency.add_metric([health.store, str(quantile)], value / 1000)
            if hour.error_rate is not None:
                error_rate.add_metric([health.store], hour.error_rate)
        yield latency
        yield error_rate

        report = self.queues.read()
        yield GaugeMetricFamily("privacy_broker_up", "1 if the broker answered", value=report.up)
        yield GaugeMetricFamily(
            "privacy_workers_alive", "Workers with a recent heartbeat", value=report.workers
        )
        depth = GaugeMetricFamily(
            "privacy_queue_messages",
            "Messages per stage queue: queued (waiting or in progress), delayed, dead",
            labels=["queue", "kind"],
        )
        for q in report.queues:
            depth.add_metric([q.queue, "queued"], q.queued)
            depth.add_metric([q.queue, "delayed"], q.delayed)
            depth.add_metric([q.queue, "dead"], q.dead)
        yield depth


def make_registry(app: App, queues: QueueReader) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(app, queues))
    return registry
