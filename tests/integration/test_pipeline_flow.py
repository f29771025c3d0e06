"""The whole pipeline, in process: real state DB (SQLite and PostgreSQL), real SMTP sink,
the reference memory connector, messages run by an inline bus."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from connectors.memory import MemoryConnector
from pipeline import contract, verification
from pipeline.audit import verify_chain
from pipeline.db import NotificationRow
from pipeline.intake import accept
from pipeline.mailsink import MailSink
from pipeline.status import describe_request
from pipeline.suppression import is_contactable
from tests.conftest import InlineBus, make_app

EMAIL = "dana.reyes@example.com"


def stores() -> dict[str, MemoryConnector]:
    crm = MemoryConnector(
        "crm",
        people=[
            {
                "id": "c1",
                "email": EMAIL,
                "name": "Dana Reyes",
                "phone": "+1 555 0100",
                "job_title": "AE",
                "contact_ok": True,
                "password_hash": "x",
            },
            {
                "id": "c2",
                "email": "dana.reyes@example.org",
                "name": "Dana Reyes",
                "contact_ok": True,
            },
        ],
        records={
            "notes": [
                {"id": "n1", "owner": "c1", "text": "called"},
                {"id": "n2", "owner": "c2", "text": "other person"},
            ]
        },
    )
    billing = MemoryConnector(
        "billing",
        people=[{"id": "b1", "email": EMAIL, "name": "Dana Reyes", "contact_ok": True}],
        records={"invoices": [{"id": "i1", "owner": "b1", "amount": "10.00"}]},
        retain={"invoices": ("Tax law requires keeping invoices", "10 years")},
    )
    return {"crm": crm, "billing": billing}


@pytest.fixture
def sink(tmp_path: Path):
    with MailSink(tmp_path / "mail", port=0) as s:
        yield s


def document(kind: str, request_id: str, **extra) -> dict:
    doc = {
        "schema": contract.SCHEMA_ID,
        "request_id": request_id,
        "type": kind,
        "subject": {"email": EMAIL, "name": "Dana Reyes"},
        "jurisdiction": "gdpr",
        "received_at": "2026-11-20T10:00:00Z",
        "channel": "web",
    }
    doc.update(extra)
    return doc


def build(state_url, tmp_path, sink, **kw):
    bus = InlineBus()
    conns = kw.pop("connectors", None) or stores()
    app = make_app(
        state_url, tmp_path / "data", connectors=conns, bus=bus, smtp_port=sink.port, **kw
    )
    return app, bus, conns


def confirm_from_mail(app, sink) -> None:
    mails = [m for m in sink.messages() if "confirm" in m["Subject"].lower()]
    assert mails, "no verification email arrived"
    body = mails[-1].get_body(("plain",)).get_content()
    token = re.search(r"/verify/(\S+)", body).group(1)
    verification.confirm(app, token)


def test_access_request_goes_from_intake_to_done_with_an_archive(state_url, tmp_path, sink):
    app, bus, _ = build(state_url, tmp_path, sink)
    assert accept(app, document("access", "r-access")).status == "accepted"
    bus.drain()
    assert describe_request(app, "r-access")["state"] == "awaiting_verification"
    confirm_from_mail(app, sink)
    bus.drain()
    info = describe_request(app, "r-access")
    assert info["state"] == "done", info
    assert info["export"]["size"] > 0
    subjects = sorted(m["Subject"] for m in sink.messages())
    assert subjects == [
        "Please confirm your privacy request",
        "We received your privacy request (access)",
        "Your Allego data is ready to download",
    ]
    with app.sessions() as s:
        assert verify_chain(s).intact


def test_each_stage_redelivered_changes_nothing_more(state_url, tmp_path, sink):
    app, bus, conns = build(state_url, tmp_path, sink)
    bus.redeliver = True
    accept(app, document("erase", "r-erase"))
    accept(app, document("erase", "r-erase"))  # the same document again: a no-op
    bus.drain()
    confirm_from_mail(app, sink)
    bus.drain()
    info = describe_request(app, "r-erase")
    assert info["state"] == "done", info
    assert len(sink.messages()) == 3  # ack, confirm, outcome: once each
    assert [p["id"] for p in conns["crm"].people] == ["c2"]  # the look-alike stays
    assert conns["billing"].records["invoices"], "invoices are retained by law"
    assert not is_contactable(EMAIL, app=app)
    assert is_contactable("dana.reyes@example.org", app=app)
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(NotificationRow)) == 3


def test_a_store_that_keeps_failing_leaves_the_request_needing_attention(state_url, tmp_path, sink):
    conns = stores()
    conns["crm"].down = True
    app, bus, _ = build(state_url, tmp_path, sink, connectors=conns)
    token = contract.sign_assertion(
        app.keys.intake_keys["allego-app"],
        request_id="r-opt",
        kind="opt_out",
        email=EMAIL,
        system="allego-app",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    accept(app, document("opt_out", "r-opt", verification=token))
    bus.drain()
    info = describe_request(app, "r-opt")
    assert info["state"] == "needs_attention"
    assert "crm" in info["reason"] and "StoreUnavailable" in info["reason"]
    crm = [t for t in info["stores"] if t["store"] == "crm"][0]
    assert crm["attempts"] == app.settings.store_max_attempts


def test_pii_is_encrypted_in_the_state_database(state_url, tmp_path, sink):
    app, bus, _ = build(state_url, tmp_path, sink)
    accept(app, document("concern", "r-concern", concern={"message": "Why do you email me?"}))
    bus.drain()
    assert describe_request(app, "r-concern")["state"] == "done"
    with app.engine.connect() as conn:
        for table in ("requests", "notifications", "audit_events", "cases", "transitions"):
            for row in conn.exec_driver_sql(f"SELECT * FROM {table}"):
                text = " ".join(str(v) for v in row)
                assert EMAIL not in text and "Dana" not in text and "email me" not in text
