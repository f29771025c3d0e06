"""Helpers shared by the integration tests: request documents and memory stores."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from connectors.memory import MemoryConnector
from pipeline import contract, topology
from pipeline.bootstrap import App
from pipeline.db import NotificationRow, RequestRow
from pipeline.outbox import Envelope
from tests.conftest import InlineBus

EMAIL = "dana.reyes@example.com"
NAME = "Dana Reyes"


def document(kind: str, request_id: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": contract.SCHEMA_ID,
        "request_id": request_id,
        "type": kind,
        "subject": {"email": EMAIL, "name": NAME, "phone": "+1 555 0100"},
        "jurisdiction": "gdpr",
        "received_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "channel": "web",
    }
    if kind == "correct":
        doc["corrections"] = [{"field": "job_title", "value": "Account Director"}]
    if kind == "concern":
        doc["concern"] = {"message": "Why do you keep emailing me?"}
    doc.update(extra)
    return doc


def presigned(app: App, kind: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """A document carrying a valid signed assertion from the demo intake system."""
    token = contract.sign_assertion(
        app.keys.intake_keys["allego-app"],
        request_id=request_id,
        kind=kind,
        email=EMAIL,
        system="allego-app",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    return document(kind, request_id, verification=token, **extra)


def stores(*, down: bool = False) -> dict[str, MemoryConnector]:
    crm = MemoryConnector(
        "crm",
        people=[
            {"id": "c1", "email": EMAIL, "name": NAME, "job_title": "AE", "contact_ok": True},
            {"id": "c2", "email": "dana.reyes@example.org", "name": NAME, "contact_ok": True},
        ],
        records={"notes": [{"id": "n1", "owner": "c1", "text": "called"}]},
    )
    crm.down = down
    return {"crm": crm}


def request_row(app: App, request_id: str) -> RequestRow:
    with app.sessions() as session:
        row = session.get(RequestRow, request_id)
        assert row is not None
        return row


def notifications(app: App, request_id: str | None = None) -> list[NotificationRow]:
    with app.sessions() as session:
        query = select(NotificationRow).order_by(NotificationRow.created_at)
        if request_id is not None:
            query = query.where(NotificationRow.request_id == request_id)
        return list(session.execute(query).scalars())


def mail_context(app: App, note: NotificationRow) -> dict[str, Any]:
    value = app.keys.ring.decrypt_json(note.context_enc, context=note.id.encode())
    assert isinstance(value, dict)
    return value


def verification_token(app: App, request_id: str) -> str:
    """The signed token from the verification email the pipeline queued."""
    notes = [n for n in notifications(app, request_id) if n.event == "verification"]
    assert len(notes) == 1, "exactly one verification email is queued"
    match = re.search(r"/verify/(\S+)$", mail_context(app, notes[0])["link"])
    assert match
    return match.group(1)


class QuietBus(InlineBus):
    """An inline bus that keeps emails queued in the outbox instead of sending them, for
    tests about stages rather than mail (the emails are asserted as notification rows)."""

    def publish(self, envelope: Envelope) -> None:
        if envelope.actor == topology.SEND_EMAIL_ACTOR:
            self.delivered.append(envelope)
            return
        super().publish(envelope)
