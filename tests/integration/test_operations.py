"""What operators do (R2, R12, invariant 5): retry a request a store failed, extend a
deadline within the law (telling the person once), cancel."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from pipeline import operations
from pipeline.db import AuditRow, StoreTaskRow
from pipeline.errors import InvalidTransition
from pipeline.intake import accept
from pipeline.policy import ExtensionRefused
from pipeline.status import describe_request
from tests.conftest import make_app
from tests.integration.support import (
    QuietBus,
    notifications,
    presigned,
    request_row,
    stores,
)


@pytest.fixture
def bus():
    return QuietBus()


@pytest.fixture
def conns():
    return stores(down=True)


@pytest.fixture
def app(state_url, tmp_path, bus, conns):
    application = make_app(
        state_url, tmp_path / "data", bus=bus, connectors=conns, store_max_attempts=3
    )
    yield application
    application.close()


def submit(app, kind: str, request_id: str, **extra) -> None:
    assert accept(app, presigned(app, kind, request_id, **extra)).status == "accepted"


def stuck(app, bus, kind: str = "erase", request_id: str = "r-1") -> None:
    submit(app, kind, request_id)
    bus.drain()
    assert request_row(app, request_id).state == "needs_attention"


def test_a_failing_store_leaves_the_request_needing_attention_with_the_reason(app, bus):
    stuck(app, bus)
    info = describe_request(app, "r-1")
    assert "crm" in info["reason"] and "StoreUnavailable" in info["reason"]
    assert info["stores"][0]["attempts"] == 3 and info["stores"][0]["status"] == "failed"
    assert info["completed_at"] is None


def test_retry_after_the_store_recovers_completes_the_request(app, bus, conns):
    stuck(app, bus)
    conns["crm"].down = False
    assert operations.retry_request(app, "r-1", actor="ops@allego") == ["crm"]
    assert request_row(app, "r-1").state == "locating"
    bus.drain()
    assert request_row(app, "r-1").state == "done"
    assert [p["id"] for p in conns["crm"].people] == ["c2"]
    with app.sessions() as session:
        retried = session.execute(
            select(AuditRow).where(AuditRow.action == "request_retried")
        ).scalar_one()
    assert retried.actor == "ops@allego"


def test_retry_gives_the_store_a_fresh_budget(app, bus, conns):
    stuck(app, bus)
    operations.retry_request(app, "r-1", actor="ops")
    with app.sessions() as session:
        task = session.execute(select(StoreTaskRow)).scalar_one()
    assert (task.status, task.attempts, task.last_error) == ("pending", 0, None)
    bus.drain()  # still down: it fails again after a full budget
    assert request_row(app, "r-1").state == "needs_attention"
    assert describe_request(app, "r-1")["stores"][0]["attempts"] == 3


def test_a_request_not_needing_attention_cannot_be_retried(app, bus, conns):
    conns["crm"].down = False
    submit(app, "erase", "r-1")
    bus.drain()
    with pytest.raises(InvalidTransition):
        operations.retry_request(app, "r-1", actor="ops")


def test_cancel_from_needs_attention_closes_the_request(app, bus):
    stuck(app, bus)
    operations.cancel_request(app, "r-1", "the person withdrew the request", actor="ops")
    row = request_row(app, "r-1")
    assert row.state == "cancelled" and row.completed_at is not None
    assert row.state_reason == "the person withdrew the request"
    with pytest.raises(InvalidTransition):
        operations.retry_request(app, "r-1", actor="ops")


def test_a_finished_request_cannot_be_cancelled(app, bus, conns):
    conns["crm"].down = False
    submit(app, "opt_out", "r-1")
    bus.drain()
    with pytest.raises(InvalidTransition):
        operations.cancel_request(app, "r-1", "too late", actor="ops")
    assert request_row(app, "r-1").state == "done"


# -- deadlines -------------------------------------------------------------------------


def extension_emails(app, request_id: str = "r-1") -> list[str]:
    return [n.event for n in notifications(app, request_id) if n.template == "extension"]


def test_an_extension_with_a_reason_moves_the_due_date_and_tells_the_person_once(app, bus):
    submit(app, "access", "r-1")
    row = request_row(app, "r-1")
    new_due = row.original_due_at + timedelta(days=30)
    operations.extend_deadline(app, "r-1", new_due, "data spread over many stores", actor="dpo")
    operations.extend_deadline(app, "r-1", new_due, "data spread over many stores", actor="dpo")
    after = request_row(app, "r-1")
    assert after.due_at == new_due
    assert after.original_due_at == row.original_due_at  # the original stays on record
    assert after.extension_reason == "data spread over many stores"
    assert len(extension_emails(app)) == 1
    note = [n for n in notifications(app, "r-1") if n.template == "extension"][0]
    context = app.keys.ring.decrypt_json(note.context_enc, context=note.id.encode())
    assert context["reason"] == "data spread over many stores"
    with app.sessions() as session:
        audited = (
            session.execute(select(AuditRow).where(AuditRow.action == "deadline_extended"))
            .scalars()
            .first()
        )
    assert audited.actor == "dpo" and audited.detail["reason"] == "data spread over many stores"


@pytest.mark.parametrize("reason", ["", "   "])
def test_an_extension_without_a_reason_is_refused_and_nothing_changes(app, reason):
    submit(app, "access", "r-1")
    before = request_row(app, "r-1")
    with pytest.raises(ExtensionRefused, match="reason"):
        operations.extend_deadline(
            app, "r-1", before.due_at + timedelta(days=10), reason, actor="dpo"
        )
    assert request_row(app, "r-1").due_at == before.due_at
    assert extension_emails(app) == []


def test_an_extension_beyond_the_legal_maximum_is_refused(app):
    submit(app, "access", "r-1")
    before = request_row(app, "r-1")
    with pytest.raises(ExtensionRefused, match="at most"):
        operations.extend_deadline(
            app, "r-1", before.received_at + timedelta(days=100), "complex", actor="dpo"
        )
    assert request_row(app, "r-1").due_at == before.due_at
    assert extension_emails(app) == []


def test_a_ccpa_extension_may_add_45_days_and_no_more(app):
    submit(app, "access", "r-1", jurisdiction="ccpa")
    row = request_row(app, "r-1")
    with pytest.raises(ExtensionRefused):
        operations.extend_deadline(
            app, "r-1", row.original_due_at + timedelta(days=46), "complex", actor="dpo"
        )
    operations.extend_deadline(
        app, "r-1", row.original_due_at + timedelta(days=45), "complex", actor="dpo"
    )
    assert request_row(app, "r-1").due_at == row.original_due_at + timedelta(days=45)


def test_an_extension_after_the_original_due_date_is_refused(app):
    submit(app, "access", "r-1")
    row = request_row(app, "r-1")
    with pytest.raises(ExtensionRefused, match="original period"):
        operations.extend_deadline(
            app,
            "r-1",
            row.original_due_at + timedelta(days=20),
            "forgot",
            actor="dpo",
            now=row.original_due_at + timedelta(hours=1),
        )
    assert extension_emails(app) == []


def test_a_finished_request_cannot_be_extended(app, bus, conns):
    conns["crm"].down = False
    submit(app, "opt_out", "r-1")
    bus.drain()
    row = request_row(app, "r-1")
    with pytest.raises(InvalidTransition):
        operations.extend_deadline(app, "r-1", row.due_at + timedelta(days=5), "late", actor="dpo")


def test_the_due_date_is_never_moved_by_the_pipeline_itself(app, bus, conns):
    submit(app, "erase", "r-1")
    due = request_row(app, "r-1").due_at
    bus.drain()
    conns["crm"].down = False
    operations.retry_request(app, "r-1", actor="ops")
    bus.drain()
    row = request_row(app, "r-1")
    assert (row.state, row.due_at, row.original_due_at) == ("done", due, due)
