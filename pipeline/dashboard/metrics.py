"""Prometheus metrics at `/metrics`, computed at scrape time from the state database and
the broker, in a registry of the dashboard's own (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from pipeline.dashboard.overview import counts, store_health
from pipeline.dashboard.queues import QueueReader
from pipeline.db import RequestRow, StoreTaskRow, TransitionRow, utcnow

if TYPE_CHECKING:
    from pipeline.bootstrap import App


STAGE_WINDOW = timedelta(hours=1)
STAGE_SAMPLE = 20_000  # transitions read at most per scrape


class PipelineCollector(Collector):
    def __init__(self, app: App, queues: QueueReader):
        self.app = app
        self.queues = queues

    def _stage_durations(self) -> Metric:
        """How long requests stayed in each state, for states left within the last hour:
        the time from entering a state to the transition that left it."""
        family = SummaryMetricFamily(
            "privacy_stage_duration_seconds",
            "Time requests spent in each stage, for stages left in the last hour",
            labels=["stage"],
        )
        since = utcnow() - STAGE_WINDOW
        with self.app.sessions() as session:
            recent = (
                select(TransitionRow.request_id)
                .where(TransitionRow.at >= since)
                .distinct()
                .limit(STAGE_SAMPLE)
                .scalar_subquery()
            )
            rows = session.execute(
                select(TransitionRow.request_id, TransitionRow.from_state, TransitionRow.at)
                .where(TransitionRow.request_id.in_(recent))
                .order_by(TransitionRow.request_id, TransitionRow.id)
            ).all()
        entered: dict[str, datetime] = {}
        totals: dict[str, list[float]] = {}
        for request_id, from_state, at in rows:
            start = entered.get(request_id)
            if from_state is not None and start is not None and at >= since:
                totals.setdefault(from_state, []).append((at - start).total_seconds())
            entered[request_id] = at
        for stage, seconds in sorted(totals.items()):
            family.add_metric([stage], count_value=len(seconds), sum_value=sum(seconds))
        return family

    def collect(self) -> Iterator[Metric]:
        requests = GaugeMetricFamily(
            "privacy_requests", "Requests by state and type", labels=["state", "type"]
        )
        with self.app.sessions() as session:
            rows = session.execute(
                select(RequestRow.state, RequestRow.type, func.count()).group_by(
                    RequestRow.state, RequestRow.type
                )
            ).all()
            failures = session.execute(
                select(StoreTaskRow.store, func.count())
                .where(StoreTaskRow.status == "failed")
                .group_by(StoreTaskRow.store)
            ).all()
            stores = session.execute(select(StoreTaskRow.store).distinct()).scalars().all()
        for state, kind, count in rows:
            requests.add_metric([state, kind], count)
        yield requests
        yield self._stage_durations()

        summary = counts(self.app, attention_limit=0)
        yield GaugeMetricFamily(
            "privacy_requests_at_risk", "Open requests due within 7 days", value=summary.at_risk
        )
        yield GaugeMetricFamily(
            "privacy_requests_overdue", "Open requests past their due date", value=summary.overdue
        )

        failed = GaugeMetricFamily(
            "privacy_store_tasks_failed",
            "Store tasks that failed after every retry, per store",
            labels=["store"],
        )
        by_store = dict.fromkeys(stores, 0) | {store: n for store, n in failures}
        for store, n in sorted(by_store.items()):
            failed.add_metric([store], n)
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
