"""Intake (R1, R5, R6, R7, R10): dedupe by request id, link repeat requests, record
rejections without PII, store due dates, and decide who needs verifying."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from pipeline import contract, topology, verification
from pipeline.db import (
    AuditRow,
    NotificationRow,
    OutboxRow,
    RejectionRow,
    RequestRow,
    TransitionRow,
)
from pipeline.intake import accept
from tests.conftest import InlineBus, make_app
from tests.integration.support import EMAIL, NAME, document, notifications, request_row

NOW = datetime.now(UTC)


@pytest.fixture
def bus():
    return InlineBus()


@pytest.fixture
def app(state_url, tmp_path, bus):
    application = make_app(state_url, tmp_path / "data", bus=bus)
    yield application
    application.close()


def count(app, model, *where) -> int:
    with app.sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def rows_text(app, table: str) -> str:
    with app.engine.connect() as conn:
        return "\n".join(
            " ".join(str(v) for v in row) for row in conn.exec_driver_sql(f"SELECT * FROM {table}")
        )


def test_a_valid_request_is_accepted_stored_and_acknowledged(app, bus):
    result = accept(app, document("access", "r-1"), now=NOW)
    assert (result.status, result.request_id) == ("accepted", "r-1")
    row = request_row(app, "r-1")
    assert row.state == "received"
    assert row.subject_hash == app.blind.email(EMAIL)
    assert [n.event for n in notifications(app, "r-1")] == ["acknowledgement"]
    assert {e.actor for e in bus.queue} == {topology.SEND_EMAIL_ACTOR, topology.VERIFY_ACTOR}


def test_the_same_request_id_with_the_same_content_is_a_duplicate_handled_once(app, bus):
    doc = document("erase", "r-dup")
    assert accept(app, doc, now=NOW).status == "accepted"
    published = len(bus.queue)
    again = accept(app, dict(reversed(list(doc.items()))), now=NOW + timedelta(minutes=1))
    assert (again.status, again.request_id) == ("duplicate", "r-dup")
    assert count(app, RequestRow) == 1
    assert count(app, NotificationRow, NotificationRow.event == "acknowledgement") == 1
    assert len(bus.queue) == published  # nothing more was asked for
    assert count(app, RejectionRow) == 0


def test_the_same_request_id_with_other_content_is_rejected_and_the_original_untouched(app):
    accept(app, document("access", "r-conflict"), now=NOW)
    before = request_row(app, "r-conflict")
    result = accept(app, document("erase", "r-conflict"), now=NOW)
    assert (result.status, result.code) == ("rejected", "conflicting_request")
    assert "request_id" in result.reason
    after = request_row(app, "r-conflict")
    assert (after.type, after.state, after.content_hash) == (
        "access",
        "received",
        before.content_hash,
    )
    with app.sessions() as session:
        rejection = session.execute(select(RejectionRow)).scalar_one()
    assert (rejection.request_id, rejection.code) == ("r-conflict", "conflicting_request")
    assert count(app, NotificationRow) == 1


def test_a_second_open_request_from_the_same_person_is_linked_not_lost(app):
    accept(app, document("access", "r-first"), now=NOW)
    other = document("erase", "r-second")
    other["subject"] = {"email": "DANA.Reyes@Example.com"}
    assert accept(app, other, now=NOW).status == "accepted"
    assert request_row(app, "r-second").linked_to == "r-first"
    assert request_row(app, "r-first").linked_to is None
    assert request_row(app, "r-second").state == "received"


def test_a_request_after_the_first_one_finished_is_not_linked(app):
    accept(app, document("access", "r-old"), now=NOW)
    with app.sessions.begin() as session:
        session.get(RequestRow, "r-old").state = "done"
    accept(app, document("access", "r-new"), now=NOW)
    assert request_row(app, "r-new").linked_to is None


def test_a_request_from_someone_else_is_not_linked(app):
    accept(app, document("access", "r-a"), now=NOW)
    doc = document("access", "r-b")
    doc["subject"] = {"email": "dana.reyes@example.org", "name": NAME}
    accept(app, doc, now=NOW)
    assert request_row(app, "r-b").linked_to is None


BAD = [
    ("unknown type", document("sell", "r-bad-1"), "unknown_type"),
    (
        "bad email",
        {**document("access", "r-bad-2"), "subject": {"email": f"{NAME} <{EMAIL}>", "name": NAME}},
        "invalid_format",
    ),
    (
        "crlf in name",
        {
            **document("access", "r-bad-3"),
            "subject": {"email": EMAIL, "name": f"{NAME}\r\nBcc: x@y.z"},
        },
        "invalid_format",
    ),
    (
        "unknown field",
        {**document("access", "r-bad-4"), "notes": f"{NAME} {EMAIL}"},
        "unknown_field",
    ),
    ("text", f"not json at all {EMAIL} {NAME}", "not_json"),
    ("list", [EMAIL, NAME], "not_json"),
]


@pytest.mark.parametrize(("raw", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_rejection_is_a_row_with_code_and_reason_and_no_pii(app, raw, code):
    result = accept(app, raw, now=NOW)
    assert (result.status, result.code) == ("rejected", code)
    with app.sessions() as session:
        rejection = session.execute(select(RejectionRow)).scalar_one()
        audited = session.execute(
            select(AuditRow).where(AuditRow.action == "request_rejected")
        ).scalar_one()
    assert rejection.code == code and rejection.reason == result.reason
    assert rejection.size > 0 and len(rejection.document_hash) == 64
    assert audited.detail["code"] == code
    assert count(app, RequestRow) == 0
    for table in ("rejections", "audit_events"):
        stored = rows_text(app, table)
        assert EMAIL not in stored and "Dana" not in stored and "Reyes" not in stored


def test_a_rejection_of_a_document_that_is_not_even_text_is_recorded(app):
    result = accept(app, 12345, now=NOW)
    assert (result.status, result.code) == ("rejected", "not_json")
    assert count(app, RejectionRow, RejectionRow.code == "not_json") == 1


def test_a_document_with_invalid_text_in_its_request_id_is_recorded_not_crashed(app):
    # found by bench/fuzz_intake.py: the rejection kept the id and its insert failed
    result = accept(app, {**document("access", "r-x"), "request_id": "r-\udcf1"}, now=NOW)
    assert (result.status, result.code, result.request_id) == ("rejected", "invalid_text", None)
    assert count(app, RejectionRow, RejectionRow.code == "invalid_text") == 1


def test_pii_of_an_accepted_request_is_stored_only_encrypted(app):
    accept(app, document("correct", "r-pii"), now=NOW)
    for table in ("requests", "notifications", "audit_events", "outbox", "transitions"):
        stored = rows_text(app, table)
        assert EMAIL not in stored and "Dana" not in stored and "Account Director" not in stored


@pytest.mark.parametrize(
    ("jurisdiction", "received", "due"),
    [
        ("gdpr", "2026-01-31T10:00:00Z", datetime(2026, 2, 28, 10, 0, tzinfo=UTC)),
        ("gdpr", "2026-10-20T23:30:00+02:00", datetime(2026, 11, 20, 21, 30, tzinfo=UTC)),
        ("ccpa", "2026-10-01T08:00:00Z", datetime(2026, 11, 15, 8, 0, tzinfo=UTC)),
        ("other", "2026-10-01T08:00:00Z", datetime(2026, 10, 31, 8, 0, tzinfo=UTC)),
    ],
)
def test_received_at_and_the_due_date_are_stored_for_each_jurisdiction(
    app, jurisdiction, received, due
):
    doc = document("access", f"r-{jurisdiction}", jurisdiction=jurisdiction, received_at=received)
    accept(app, doc, now=NOW)
    row = request_row(app, f"r-{jurisdiction}")
    assert row.received_at == datetime.fromisoformat(received.replace("Z", "+00:00"))
    assert row.due_at == due
    assert row.original_due_at == due
    assert row.jurisdiction == jurisdiction


def transitions(app, request_id) -> list[tuple[str | None, str]]:
    with app.sessions() as session:
        rows = session.execute(
            select(TransitionRow)
            .where(TransitionRow.request_id == request_id)
            .order_by(TransitionRow.id)
        ).scalars()
        return [(t.from_state, t.to_state) for t in rows]


@pytest.mark.parametrize("kind", ["opt_out", "concern"])
def test_opt_out_and_concern_skip_verification(app, bus, kind):
    accept(app, document(kind, f"r-{kind}"), now=NOW)
    verification.start(app, f"r-{kind}", now=NOW)
    row = request_row(app, f"r-{kind}")
    assert row.state == "verified"
    assert row.verified_by == "not_required"
    assert transitions(app, f"r-{kind}") == [(None, "received"), ("received", "verified")]
    assert [n.event for n in notifications(app, f"r-{kind}")] == ["acknowledgement"]
    next_actor = topology.ACT_ACTOR if kind == "concern" else topology.LOCATE_ACTOR
    assert bus.queue[-1].actor == next_actor


@pytest.mark.parametrize("kind", ["access", "correct", "erase"])
def test_disclosure_and_deletion_wait_for_the_email_link(app, kind):
    accept(app, document(kind, f"r-{kind}"), now=NOW)
    verification.start(app, f"r-{kind}", now=NOW)
    assert request_row(app, f"r-{kind}").state == "awaiting_verification"
    assert [n.event for n in notifications(app, f"r-{kind}")] == ["acknowledgement", "verification"]


def signed(app, request_id: str, request_kind: str, **overrides):
    fields = {
        "request_id": request_id,
        "kind": request_kind,
        "email": EMAIL,
        "system": "allego-app",
        "expires_at": NOW + timedelta(minutes=30),
    }
    fields.update(overrides)
    return contract.sign_assertion(app.keys.intake_keys["allego-app"], **fields)


def test_a_valid_assertion_skips_the_email_link(app, bus):
    doc = document("erase", "r-asserted", verification=signed(app, "r-asserted", "erase"))
    assert accept(app, doc, now=NOW).status == "accepted"
    assert request_row(app, "r-asserted").verified_by == "assertion:allego-app"
    verification.start(app, "r-asserted", now=NOW)
    row = request_row(app, "r-asserted")
    assert row.state == "verified"
    assert row.verified_by == "assertion:allego-app"
    assert "verification" not in [n.event for n in notifications(app, "r-asserted")]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"email": "someone.else@example.com"}, "bad_assertion"),
        ({"kind": "access"}, "bad_assertion"),
        ({"system": "unknown-app"}, "bad_assertion"),
        ({"expires_at": NOW - timedelta(seconds=1)}, "expired_assertion"),
    ],
    ids=["other email", "other type", "unknown system", "expired"],
)
def test_an_invalid_assertion_is_rejected_not_downgraded_to_email(app, overrides, code):
    doc = document("erase", "r-forged", verification=signed(app, "r-forged", "erase", **overrides))
    result = accept(app, doc, now=NOW)
    assert (result.status, result.code) == ("rejected", code)
    assert count(app, RequestRow) == 0
    assert count(app, NotificationRow) == 0
    assert count(app, OutboxRow) == 0
    assert count(app, RejectionRow, RejectionRow.request_id == "r-forged") == 1
