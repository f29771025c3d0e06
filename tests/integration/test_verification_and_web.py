"""Verification by email link and the export download (R7, R9, R18), through the web app
on a real state database: a GET changes nothing, only a POST with its CSRF token confirms."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import select, update

from pipeline import topology, verification
from pipeline.crypto import Signer, b64d
from pipeline.db import ExportRow, NotificationRow, VerificationRow
from pipeline.intake import accept
from pipeline.notify import DOWNLOAD_PURPOSE
from pipeline.web import _csrf_for, create_app
from tests.conftest import make_app
from tests.integration.support import (
    QuietBus,
    document,
    mail_context,
    notifications,
    request_row,
    stores,
    verification_token,
)


@pytest.fixture
def bus():
    return QuietBus()


@pytest.fixture
def namespace():
    """The web's rate-limit counters go to Redis under this test's own prefix."""
    name = f"test-web-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def app(state_url, tmp_path, bus, namespace):
    application = make_app(
        state_url, tmp_path / "data", bus=bus, connectors=stores(), queue_namespace=namespace
    )
    yield application
    application.close()


@pytest.fixture
def web(app):
    return create_app(app)


def awaiting(app, bus, request_id: str = "r-1", kind: str = "access", **start) -> str:
    accept(app, document(kind, request_id))
    verification.start(app, request_id, **start)
    bus.queue.clear()
    return verification_token(app, request_id)


def csrf_of(page: bytes) -> str:
    match = re.search(rb'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "the confirmation page has no CSRF field"
    return match.group(1).decode()


def link_row(app, request_id: str) -> VerificationRow:
    with app.sessions() as session:
        return session.execute(
            select(VerificationRow).where(VerificationRow.request_id == request_id)
        ).scalar_one()


def test_opening_a_valid_link_shows_the_form_and_changes_nothing(app, bus, web):
    token = awaiting(app, bus)
    response = web.test_client().get(f"/verify/{token}")
    assert response.status_code == 200
    assert b"<form" in response.data and b"Confirm" in response.data
    assert "privacy_csrf" in response.headers["Set-Cookie"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert request_row(app, "r-1").state == "awaiting_verification"
    assert link_row(app, "r-1").used_at is None
    assert not bus.queue


def test_opening_the_link_twice_still_changes_nothing(app, bus, web):
    token = awaiting(app, bus)
    for _ in range(2):
        assert web.test_client().get(f"/verify/{token}").status_code == 200
    assert request_row(app, "r-1").state == "awaiting_verification"


def test_a_post_without_the_csrf_cookie_is_refused_and_changes_nothing(app, bus, web):
    token = awaiting(app, bus)
    csrf = csrf_of(web.test_client().get(f"/verify/{token}").data)
    response = web.test_client().post(f"/verify/{token}", data={"csrf": csrf})
    assert response.status_code == 403
    assert request_row(app, "r-1").state == "awaiting_verification"
    assert link_row(app, "r-1").used_at is None
    assert not bus.queue


def test_a_post_without_the_csrf_field_is_refused_and_changes_nothing(app, bus, web):
    token = awaiting(app, bus)
    client = web.test_client()
    client.get(f"/verify/{token}")
    assert client.post(f"/verify/{token}", data={}).status_code == 403
    assert client.post(f"/verify/{token}", data={"csrf": "0" * 64}).status_code == 403
    assert request_row(app, "r-1").state == "awaiting_verification"
    assert not bus.queue


def test_a_csrf_token_from_another_link_is_refused(app, bus, web):
    token = awaiting(app, bus, "r-1")
    other = awaiting(app, bus, "r-2")
    client = web.test_client()
    csrf_other = csrf_of(client.get(f"/verify/{other}").data)
    assert client.post(f"/verify/{token}", data={"csrf": csrf_other}).status_code == 403
    assert request_row(app, "r-1").state == "awaiting_verification"


def test_a_post_with_the_csrf_token_confirms_and_asks_for_locate(app, bus, web):
    token = awaiting(app, bus)
    client = web.test_client()
    csrf = csrf_of(client.get(f"/verify/{token}").data)
    response = client.post(f"/verify/{token}", data={"csrf": csrf})
    assert response.status_code == 200
    row = request_row(app, "r-1")
    assert (row.state, row.verified_by) == ("verified", "email_link")
    assert link_row(app, "r-1").used_at is not None
    # stage messages carry a list of ids (pipeline.batch)
    assert [(e.actor, e.args) for e in bus.queue] == [(topology.LOCATE_ACTOR, (["r-1"],))]


def test_a_second_post_is_refused_as_already_used(app, bus, web):
    token = awaiting(app, bus)
    client = web.test_client()
    csrf = csrf_of(client.get(f"/verify/{token}").data)
    assert client.post(f"/verify/{token}", data={"csrf": csrf}).status_code == 200
    bus.queue.clear()
    again = client.post(f"/verify/{token}", data={"csrf": csrf})
    assert again.status_code == 409
    assert client.get(f"/verify/{token}").status_code == 409
    assert not bus.queue
    assert request_row(app, "r-1").state == "verified"


@pytest.mark.parametrize(
    "alter",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: "x" + t,
        lambda t: t.split(".")[0],
        lambda t: "not-a-token",
    ],
    ids=["last char", "prefix", "payload only", "garbage"],
)
def test_an_altered_token_is_not_found(app, bus, web, alter):
    token = awaiting(app, bus)
    client = web.test_client()
    assert client.get(f"/verify/{alter(token)}").status_code == 404
    client.get(f"/verify/{token}")  # a valid cookie, and a CSRF token made for the altered link
    nonce = client.get_cookie("privacy_csrf").value
    csrf = _csrf_for(app, nonce, alter(token))
    assert client.post(f"/verify/{alter(token)}", data={"csrf": csrf}).status_code == 404
    assert request_row(app, "r-1").state == "awaiting_verification"
    assert link_row(app, "r-1").used_at is None


def test_an_expired_link_is_gone(state_url, tmp_path):
    bus = QuietBus()
    app = make_app(state_url, tmp_path / "data", bus=bus, verify_ttl_seconds=60)
    try:
        token = awaiting(app, bus, now=datetime.now(UTC) - timedelta(hours=1))
        client = create_app(app).test_client()
        assert client.get(f"/verify/{token}").status_code == 410
        with pytest.raises(verification.LinkRefused) as info:
            verification.confirm(app, token)
        assert info.value.kind == "expired"
        assert request_row(app, "r-1").state == "awaiting_verification"
    finally:
        app.close()


def test_a_link_confirmed_after_its_row_expired_is_refused_even_if_signed_later(app, bus):
    token = awaiting(app, bus)
    later = datetime.now(UTC) + timedelta(seconds=app.settings.verify_ttl_seconds + 5)
    with pytest.raises(verification.LinkRefused) as info:
        verification.confirm(app, token, now=later)
    assert info.value.kind == "expired"


def test_expire_due_closes_unconfirmed_requests_and_tells_the_person_once(app, bus):
    awaiting(app, bus, "r-old", now=datetime.now(UTC) - timedelta(days=4))
    awaiting(app, bus, "r-fresh")
    assert verification.expire_due(app) == 1
    assert verification.expire_due(app) == 0  # a second run finds nothing more
    old = request_row(app, "r-old")
    assert old.state == "expired" and old.completed_at is not None
    assert request_row(app, "r-fresh").state == "awaiting_verification"
    events = [n.event for n in notifications(app, "r-old")]
    assert events.count("verification_expired") == 1
    assert "verification_expired" not in [n.event for n in notifications(app, "r-fresh")]
    sent = [e for e in bus.delivered if e.actor == topology.SEND_EMAIL_ACTOR]
    expired_note = [n for n in notifications(app, "r-old") if n.event == "verification_expired"][0]
    assert [e.args for e in sent].count(([expired_note.id],)) == 1


def test_expire_due_leaves_confirmed_requests_alone(app, bus):
    token = awaiting(app, bus, now=datetime.now(UTC) - timedelta(hours=71))
    verification.confirm(app, token)
    assert verification.expire_due(app, now=datetime.now(UTC) + timedelta(days=5)) == 0
    assert request_row(app, "r-1").state == "verified"


# -- download -------------------------------------------------------------------------


def finished_access(app, bus, web, token: str | None = None) -> str:
    token = token or awaiting(app, bus)
    client = web.test_client()
    client.post(f"/verify/{token}", data={"csrf": csrf_of(client.get(f"/verify/{token}").data)})
    bus.drain()
    assert request_row(app, "r-1").state == "done"
    with app.sessions() as session:
        note = session.execute(
            select(NotificationRow).where(NotificationRow.event == "outcome")
        ).scalar_one()
    link = mail_context(app, note)["link"]
    return "/download/" + link.rsplit("/download/", 1)[1]


def test_a_valid_download_link_streams_a_zip_that_opens(app, bus, web):
    path = finished_access(app, bus, web)
    response = web.test_client().get(path)
    assert response.status_code == 200
    assert response.mimetype == "application/zip"
    assert 'filename="allego-data-r-1.zip"' in response.headers["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.data))
    assert archive.testzip() is None
    names = set(archive.namelist())
    assert {"facts.json", "summary.html", "crm/records.json"} <= names
    assert b"dana.reyes@example.com" in archive.read("crm/records.json")
    with app.sessions() as session:
        assert session.execute(select(ExportRow.downloads)).scalar_one() == 1


def test_a_person_we_hold_nothing_on_gets_an_archive_that_says_so(app, bus, web):
    # the same journey as for a known person (R8): confirmed, then an archive and its link
    accept(app, document("access", "r-1", subject={"email": "nobody.held@example.net"}))
    verification.start(app, "r-1")
    bus.queue.clear()
    path = finished_access(app, bus, web, verification_token(app, "r-1"))
    archive = zipfile.ZipFile(io.BytesIO(web.test_client().get(path).data))
    assert archive.testzip() is None
    assert {"facts.json", "summary.html"} <= set(archive.namelist())
    assert not [n for n in archive.namelist() if n.endswith("records.json")]
    assert json.loads(archive.read("facts.json"))["stores"] == {}
    assert b"We hold no data about you in any Allego product." in archive.read("summary.html")


def test_an_expired_export_is_gone(app, bus, web):
    path = finished_access(app, bus, web)
    with app.sessions.begin() as session:
        session.execute(
            update(ExportRow).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert web.test_client().get(path).status_code == 410


def test_a_revoked_export_is_not_found(app, bus, web):
    path = finished_access(app, bus, web)
    with app.sessions.begin() as session:
        session.execute(update(ExportRow).values(revoked_at=datetime.now(UTC)))
    assert web.test_client().get(path).status_code == 404


def test_a_tampered_download_link_is_not_found(app, bus, web):
    path = finished_access(app, bus, web)
    payload, expiry, mac = path.rsplit("/", 1)[1].split(".")
    client = web.test_client()
    assert client.get(f"/download/{payload}.{int(expiry) + 3600}.{mac}").status_code == 404
    assert client.get(f"/download/{payload[:-2]}AA.{expiry}.{mac}").status_code == 404
    assert client.get(f"/download/{payload}.{expiry}").status_code == 404
    with app.sessions() as session:
        assert session.execute(select(ExportRow.downloads)).scalar_one() == 0


def downloads(app) -> int:
    with app.sessions() as session:
        return session.execute(select(ExportRow.downloads)).scalar_one()


def test_a_guessed_altered_or_revoked_download_link_gets_the_same_not_found_page(app, bus, web):
    path = finished_access(app, bus, web)
    token = path.rsplit("/", 1)[1]
    payload, expiry, mac = token.split(".")
    client = web.test_client()
    signer = app.keys.signer(DOWNLOAD_PURPOSE)
    forged_key = Signer(b"k" * 32, purpose=DOWNLOAD_PURPOSE)
    guesses = [
        "0" * len(token),  # a guess
        forged_key.sign(str(uuid.uuid4()), ttl_seconds=3600),  # well formed, another key
        forged_key.sign(b64d(payload).decode(), ttl_seconds=3600),  # another key, a real id
        signer.sign(str(uuid.uuid4()), ttl_seconds=3600),  # authentic, but no such export
        f"{payload}.{expiry}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",  # altered mac
    ]
    pages = [client.get(f"/download/{guess}") for guess in guesses]
    assert [p.status_code for p in pages] == [404] * len(guesses)
    assert len({p.data for p in pages}) == 1, "every refusal looks the same"
    with app.sessions.begin() as session:
        session.execute(update(ExportRow).values(revoked_at=datetime.now(UTC)))
    revoked = client.get(path)
    assert revoked.status_code == 404
    assert revoked.data == pages[0].data  # a revoked export is not told apart from none
    assert revoked.mimetype == "text/html"
    assert downloads(app) == 0


def test_a_download_link_past_its_signed_expiry_is_gone_and_counts_nothing(app, bus, web):
    finished_access(app, bus, web)
    with app.sessions() as session:
        export_id = session.execute(select(ExportRow.id)).scalar_one()
    stale = app.keys.signer(DOWNLOAD_PURPOSE).sign(
        export_id, ttl_seconds=60, now=time.time() - 3600
    )
    response = web.test_client().get(f"/download/{stale}")
    assert response.status_code == 410
    assert b"expired" in response.data
    assert downloads(app) == 0


def test_a_verification_token_is_not_a_download_token(app, bus, web):
    token = awaiting(app, bus)
    assert web.test_client().get(f"/download/{token}").status_code == 404


def test_a_link_dies_after_too_many_failed_confirmations_and_the_request_expires(app, bus, web):
    token = awaiting(app, bus)
    client = web.test_client()
    client.get(f"/verify/{token}")
    for _ in range(app.settings.verify_max_attempts):
        assert client.post(f"/verify/{token}", data={"csrf": "0" * 64}).status_code == 403
    nonce = client.get_cookie("privacy_csrf").value
    refused = client.post(f"/verify/{token}", data={"csrf": _csrf_for(app, nonce, token)})
    assert refused.status_code == 410
    assert request_row(app, "r-1").state == "awaiting_verification"
    assert verification.expire_due(app) == 1
    assert request_row(app, "r-1").state == "expired"
