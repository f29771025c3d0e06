"""No account enumeration (R8): a request for an address we hold data on and one for an
address nobody knows get the same answers, and are handled by the same code.

Identity is verified before any store is searched, so up to the person's confirmation
nothing can depend on whether the address is known. These tests show it: every
observable answer (the intake outcome, the acknowledgement and the confirmation mail,
the web pages, the audit trail) is the same apart from ids and tokens, and the sequence
of pipeline functions called is identical, with no connector touched. Time is not
asserted here: `bench/enumeration_timing.py` measures it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from sqlalchemy import select

from pipeline import verification
from pipeline.db import AuditRow, RequestRow
from pipeline.intake import accept
from pipeline.web import create_app
from tests.conftest import make_app
from tests.integration.support import (
    EMAIL,
    QuietBus,
    document,
    mail_context,
    notifications,
    stores,
)

REPO = Path(__file__).resolve().parents[2]
TRACED = (str(REPO / "pipeline"), str(REPO / "connectors"))
KNOWN = EMAIL  # the store holds a person with this address
UNKNOWN = "nobody.known@example.net"  # no store holds it
RECEIVED_AT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
NOW = RECEIVED_AT + timedelta(minutes=5)


@dataclass
class Journey:
    """Everything a caller could observe of one request up to its confirmation."""

    intake: dict[str, Any] = field(default_factory=dict)
    mails: list[tuple[str, str, str, str]] = field(default_factory=list)
    pages: list[tuple[str, int, str, str]] = field(default_factory=list)
    audit: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)


@pytest.fixture
def bus():
    return QuietBus()


@pytest.fixture
def app(state_url, tmp_path, bus):
    connectors = stores()
    application = make_app(state_url, tmp_path / "data", bus=bus, connectors=connectors)
    yield application
    application.close()


@pytest.fixture
def web(app):
    return create_app(app)


def known_to_the_store(app, email: str) -> bool:
    crm = app.connectors["crm"]
    return any(p["email"] == email for p in crm.people)


def normalise(text: str, request_id: str, tokens: list[str]) -> str:
    for token in tokens:
        text = text.replace(token, "<token>")
    text = re.sub(r'name="csrf" value="[0-9a-f]+"', 'name="csrf" value="<csrf>"', text)
    return text.replace(request_id, "<request>")


class CallRecorder:
    """The pipeline and connector functions entered, in order (a profile hook)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, frame: FrameType, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(TRACED):
            path = Path(frame.f_code.co_filename).relative_to(REPO)
            self.calls.append(f"{path}:{frame.f_code.co_qualname}")

    def __enter__(self) -> CallRecorder:
        sys.setprofile(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        sys.setprofile(None)


def journey(app, web, bus, request_id: str, email: str) -> Journey:
    """Submit, get mailed, open the link, confirm, and try the used and an altered link."""
    seen = Journey()
    doc = document("access", request_id, received_at=RECEIVED_AT.isoformat())
    doc["subject"]["email"] = email
    client = web.test_client()
    with CallRecorder() as recorder:
        result = accept(app, doc, now=NOW)
        verification.start(app, request_id, now=NOW)
        notes = notifications(app, request_id)
        links = [mail_context(app, n).get("link", "") for n in notes]
        token = next(link.rsplit("/verify/", 1)[1] for link in links if "/verify/" in link)
        altered = token[:-1] + ("A" if token[-1] != "A" else "B")
        page = client.get(f"/verify/{token}")
        csrf = re.search(rb'name="csrf" value="([0-9a-f]+)"', page.data)
        assert csrf is not None
        confirmed = client.post(f"/verify/{token}", data={"csrf": csrf.group(1).decode()})
        again = client.post(f"/verify/{token}", data={"csrf": csrf.group(1).decode()})
        reopened = client.get(f"/verify/{token}")
        forged = client.get(f"/verify/{altered}")
    seen.calls = recorder.calls
    tokens = [token, altered]
    seen.intake = {**result.__dict__, "request_id": result.request_id == request_id}
    for note in notes:
        rendered = app.mailer.templates.render(note.template, mail_context(app, note))
        seen.mails.append(
            (
                note.event,
                normalise(rendered.subject, request_id, tokens),
                normalise(rendered.text, request_id, tokens),
                normalise(rendered.html, request_id, tokens),
            )
        )
    for name, response in [
        ("page", page),
        ("confirmed", confirmed),
        ("again", again),
        ("reopened", reopened),
        ("forged", forged),
    ]:
        headers = sorted(
            (k, re.sub(r"privacy_csrf=[^;]+|Expires=[^;]+", "<varies>", v))
            for k, v in response.headers.items()
        )
        seen.pages.append(
            (
                name,
                response.status_code,
                normalise(response.get_data(as_text=True), request_id, tokens),
                repr(headers),
            )
        )
    with app.sessions() as session:
        rows = session.execute(
            select(AuditRow).where(AuditRow.request_id == request_id).order_by(AuditRow.id)
        ).scalars()
        seen.audit = [(row.action, tuple(sorted(row.detail))) for row in rows]
    return seen


def test_a_known_and_an_unknown_address_get_the_same_answers_by_the_same_code(app, web, bus):
    assert known_to_the_store(app, KNOWN) and not known_to_the_store(app, UNKNOWN)
    journey(app, web, bus, "warm-up", "someone.else@example.com")  # caches filled alike
    known = journey(app, web, bus, "r-known", KNOWN)
    unknown = journey(app, web, bus, "r-unknown", UNKNOWN)

    assert (
        known.intake
        == unknown.intake
        == {
            "status": "accepted",
            "request_id": True,
            "code": None,
            "reason": None,
        }
    )
    assert [m[0] for m in known.mails] == ["acknowledgement", "verification"]
    assert known.mails == unknown.mails
    assert [(p[0], p[1]) for p in known.pages] == [
        ("page", 200),
        ("confirmed", 200),
        ("again", 409),
        ("reopened", 409),
        ("forged", 404),
    ]
    assert known.pages == unknown.pages
    assert known.audit == unknown.audit
    assert known.calls, "the recorder saw no pipeline code"
    assert known.calls == unknown.calls
    assert not [c for c in known.calls if c.startswith("connectors/")], "a store was searched"


def test_requests_for_known_and_unknown_addresses_are_stored_alike(app, web, bus):
    journey(app, web, bus, "r-known", KNOWN)
    journey(app, web, bus, "r-unknown", UNKNOWN)
    with app.sessions() as session:
        rows = {r.id: r for r in session.execute(select(RequestRow)).scalars()}
    differ = {"id", "subject_hash", "subject_enc", "content_hash", "created_at", "updated_at"}
    differ |= {"verified_at"}
    columns = [c.key for c in RequestRow.__table__.columns if c.key not in differ]
    known = {c: getattr(rows["r-known"], c) for c in columns}
    unknown = {c: getattr(rows["r-unknown"], c) for c in columns}
    assert known == unknown
    assert known["state"] == "verified" and known["linked_to"] is None
