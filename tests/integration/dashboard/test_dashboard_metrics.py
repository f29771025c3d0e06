"""`/metrics` and the queue panel: counts from the state database, depths from the real
Redis the broker uses, and zeros with `privacy_broker_up 0` when Redis is down."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import inspect

from pipeline import topology
from pipeline.bootstrap import DramatiqBus, make_broker
from pipeline.cli import main
from pipeline.dashboard.app import create_dashboard
from pipeline.dashboard.auth import list_operators
from pipeline.db import Base
from pipeline.outbox import Envelope
from tests.conftest import make_app
from tests.integration.dashboard.conftest import sign_in, stuck


def samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.data.decode())
        for s in family.samples
    }


def test_metrics_count_requests_by_state_and_type_and_failed_stores(app, bus, conns, dashboard):
    stuck(app, bus, conns)
    stuck(app, bus, conns, "r-stuck-2")
    values = samples(dashboard.test_client())
    assert values[("privacy_requests", (("state", "needs_attention"), ("type", "erase")))] == 2
    assert values[("privacy_store_tasks_failed", (("store", "crm"),))] == 2
    assert values[("privacy_requests_overdue", ())] == 0


def test_metrics_need_no_sign_in_and_hold_no_personal_data(app, bus, conns, dashboard):
    stuck(app, bus, conns)
    text = dashboard.test_client().get("/metrics").data.decode()
    assert "dana" not in text.lower() and "r-stuck" not in text


def test_a_broker_that_is_down_reads_as_zero_and_broker_up_0(state_url, tmp_path):
    app = make_app(state_url, tmp_path / "data", broker_url="redis://127.0.0.1:1/0")
    try:
        web = create_dashboard(app)
        values = samples(web.test_client())
        assert values[("privacy_broker_up", ())] == 0
        depth = ("privacy_queue_messages", (("kind", "queued"), ("queue", topology.LOCATE_QUEUE)))
        assert values[depth] == 0
    finally:
        app.close()


@pytest.mark.redis
def test_queue_depths_come_from_the_real_redis_broker(app, dashboard):
    broker = make_broker(app.settings)
    bus = DramatiqBus(broker)
    queue = topology.LOCATE_QUEUE
    broker.declare_queue(queue)
    try:
        for _ in range(3):
            bus.publish(
                Envelope(id=str(uuid.uuid4()), actor="locate_request", queue=queue, args=("r",))
            )
        bus.publish(
            Envelope(
                id=str(uuid.uuid4()),
                actor="locate_request",
                queue=queue,
                args=("r",),
                delay_ms=600_000,
            )
        )
        consumer = broker.consume(queue, timeout=2000)  # dead-letter one, as a failing actor would
        message = next(m for m in consumer if m is not None)
        consumer.nack(message)
        consumer.close()
        values = samples(dashboard.test_client())
        assert values[("privacy_broker_up", ())] == 1
        key = lambda kind: ("privacy_queue_messages", (("kind", kind), ("queue", queue)))  # noqa: E731
        assert (values[key("queued")], values[key("delayed")], values[key("dead")]) == (2, 1, 1)
        home = sign_in(dashboard.test_client(), "vic").get("/").data.decode()
        assert (
            f'<td>{queue}</td><td class="num">2</td><td class="num">1</td><td class="num">1</td>'
            in home
        )
        assert "<svg" in home
    finally:
        broker.flush_all()
        broker.client.delete(
            f"{app.settings.queue_namespace}:{queue}.XQ",
            f"{app.settings.queue_namespace}:{queue}.XQ.msgs",
        )
        broker.close()


def test_the_0002_migration_matches_the_models_and_adds_the_list_indexes(app):
    with app.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        indexes = {i["name"] for i in inspect(conn).get_indexes("requests")}
        assert {"operators", "operator_sessions"} <= set(inspect(conn).get_table_names())
    assert diff == []
    assert {"ix_requests_state", "ix_requests_type", "ix_requests_due_at_id"} <= indexes


def test_the_cli_creates_the_first_admin_who_can_sign_in(state_url, tmp_path):
    app = make_app(state_url, tmp_path / "data")
    try:
        env = {"PRIVACY_DATA_DIR": str(tmp_path / "data"), "PRIVACY_DATABASE_URL": state_url}
        result = CliRunner().invoke(
            main,
            ["operator", "create", "root-admin", "--role", "admin", "--password-stdin"],
            input="first-admin-password\n",
            env=env,
        )
        assert result.exit_code == 0, result.output
        assert [(o.name, o.role) for o in list_operators(app)] == [("root-admin", "admin")]
        sign_in(create_dashboard(app).test_client(), "root-admin", "first-admin-password")
        again = CliRunner().invoke(
            main,
            ["operator", "create", "root-admin", "--role", "admin", "--password-stdin"],
            input="first-admin-password\n",
            env=env,
        )
        assert again.exit_code != 0 and "exists" in again.output
    finally:
        app.close()


def test_an_old_request_due_yesterday_counts_as_overdue_in_metrics(app, dashboard):
    from tests.integration.dashboard.conftest import submit

    submit(app, "access", "old", received_at=(datetime.now(UTC) - timedelta(days=40)).isoformat())
    assert samples(dashboard.test_client())[("privacy_requests_overdue", ())] == 1


def test_metrics_report_how_long_requests_spent_in_each_stage(app, dashboard):
    from sqlalchemy import delete

    from pipeline.db import TransitionRow, utcnow
    from pipeline.intake import accept
    from tests.integration.support import document

    now = utcnow()
    for rid in ("m-1", "m-2"):
        assert accept(app, document("concern", rid)).status == "accepted"
    steps = [
        (None, "received", 30),
        ("received", "verified", 28),
        ("verified", "locating", 27),
        ("locating", "acting", 21),
        ("acting", "notifying", 1),
        ("notifying", "done", 0),
    ]
    with app.sessions.begin() as session:
        session.execute(delete(TransitionRow))  # replace intake's with a known history
        for rid in ("m-1", "m-2"):
            for before, after, minutes_ago in steps:
                session.add(
                    TransitionRow(
                        request_id=rid,
                        from_state=before,
                        to_state=after,
                        at=now - timedelta(minutes=minutes_ago),
                    )
                )
    values = samples(dashboard.test_client())
    stage = "privacy_stage_duration_seconds"
    assert values[(f"{stage}_count", (("stage", "locating"),))] == 2
    assert values[(f"{stage}_sum", (("stage", "locating"),))] == pytest.approx(2 * 6 * 60)
    assert values[(f"{stage}_sum", (("stage", "acting"),))] == pytest.approx(2 * 20 * 60)
    assert (f"{stage}_count", (("stage", "done"),)) not in values  # nothing left "done"
