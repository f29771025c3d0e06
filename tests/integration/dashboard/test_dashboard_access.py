"""Need-to-know access (R29): sign-in, sessions, CSRF and roles, enforced by the server."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from pipeline.audit import verify_chain
from pipeline.dashboard import auth
from pipeline.dashboard.models import OperatorRow, OperatorSessionRow
from pipeline.dashboard.views import SESSION_COOKIE
from pipeline.db import AuditRow, utcnow
from tests.integration.dashboard.conftest import (
    FAST,
    csrf_in,
    form_csrf,
    sign_in,
    stuck,
)
from tests.integration.support import request_row


def audit_actions(app, action: str) -> list[AuditRow]:
    with app.sessions() as session:
        return list(session.execute(select(AuditRow).where(AuditRow.action == action)).scalars())


def session_token(client) -> str:
    cookie = client.get_cookie(SESSION_COOKIE)
    assert cookie is not None
    return cookie.value


def test_pages_send_a_signed_out_browser_to_sign_in(dashboard):
    client = dashboard.test_client()
    for path in ("/", "/requests", "/requests/r-1", "/operators"):
        response = client.get(path)
        assert response.status_code == 302
        assert response.location.startswith("/signin?next=")


def test_an_action_without_a_session_is_refused(app, bus, conns, dashboard):
    stuck(app, bus, conns)
    response = dashboard.test_client().post("/requests/r-stuck/retry", data={"csrf": "x"})
    assert response.status_code == 401
    assert request_row(app, "r-stuck").state == "needs_attention"


def test_sign_in_sets_a_session_cookie_that_scripts_and_other_sites_cannot_use(dashboard):
    client = dashboard.test_client()
    page = client.get("/signin").data
    response = client.post(
        "/signin", data={"csrf": csrf_in(page), "name": "vic", "password": "viewer-password-1"}
    )
    assert response.status_code == 302 and response.location == "/"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=28800" in cookie
    assert client.get("/").status_code == 200


def test_the_session_table_holds_a_hash_of_the_token_not_the_token(app, viewer):
    token = session_token(viewer)
    with app.sessions() as session:
        stored = list(session.execute(select(OperatorSessionRow.token_hash)).scalars())
    assert token not in stored and len(stored) == 1


@pytest.mark.parametrize(
    ("name", "password"), [("vic", "wrong-password-1"), ("nobody", "viewer-password-1")]
)
def test_a_wrong_name_or_password_is_refused_and_audited(app, dashboard, name, password):
    client = dashboard.test_client()
    page = client.get("/signin").data
    response = client.post(
        "/signin", data={"csrf": csrf_in(page), "name": name, "password": password}
    )
    assert response.status_code == 401
    assert b"do not match" in response.data
    assert client.get("/").status_code == 302
    refused = audit_actions(app, "operator_sign_in_refused")
    assert [r.actor for r in refused] == ["vic" if name == "vic" else "unknown"]


def test_the_sign_in_form_needs_its_own_csrf_token(dashboard):
    client = dashboard.test_client()
    client.get("/signin")
    response = client.post(
        "/signin", data={"csrf": "forged", "name": "vic", "password": "viewer-password-1"}
    )
    assert response.status_code == 403
    assert client.get("/").status_code == 302


def test_signing_in_again_gives_a_new_token_and_ends_the_old_one(app, dashboard):
    client = sign_in(dashboard.test_client(), "vic")
    first = session_token(client)
    sign_in(client, "vic")
    second = session_token(client)
    assert first != second
    assert auth.resume(app, first) is None
    assert auth.resume(app, second) is not None


def test_signing_out_ends_the_session_on_the_server(app, viewer):
    token = session_token(viewer)
    response = viewer.post("/signout", data={"csrf": form_csrf(viewer)})
    assert response.status_code == 302
    assert auth.resume(app, token) is None
    viewer.set_cookie(SESSION_COOKIE, token)  # a copied cookie is worth nothing now
    assert viewer.get("/").status_code == 302


def test_a_session_past_its_lifetime_signs_nobody_in(app, viewer):
    with app.sessions.begin() as session:
        session.execute(
            update(OperatorSessionRow).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert viewer.get("/").status_code == 302


def test_a_session_left_idle_signs_nobody_in(app, viewer):
    token = session_token(viewer)
    with app.sessions.begin() as session:
        session.execute(
            update(OperatorSessionRow).values(
                last_seen_at=utcnow() - auth.SESSION_IDLE - timedelta(seconds=1)
            )
        )
    assert viewer.get("/").status_code == 302
    assert auth.resume(app, token) is None


def test_a_disabled_operator_is_signed_out_at_once_and_cannot_sign_in(app, viewer, admin):
    response = admin.post("/operators/vic/disable", data={"csrf": form_csrf(admin, "/operators")})
    assert response.status_code == 302
    assert viewer.get("/").status_code == 302
    client = viewer.application.test_client()
    page = client.get("/signin").data
    response = client.post(
        "/signin", data={"csrf": csrf_in(page), "name": "vic", "password": "viewer-password-1"}
    )
    assert response.status_code == 401
    assert [r.actor for r in audit_actions(app, "operator_disabled")] == ["ada"]


def test_a_post_without_the_session_csrf_token_is_refused_and_changes_nothing(
    app, bus, conns, officer
):
    stuck(app, bus, conns)
    for data in ({}, {"csrf": "forged"}):
        response = officer.post("/requests/r-stuck/retry", data=data)
        assert response.status_code == 403
        assert b"out of date" in response.data
    assert request_row(app, "r-stuck").state == "needs_attention"
    assert audit_actions(app, "request_retried") == []


def test_a_csrf_token_of_another_session_is_refused(app, bus, conns, officer, dashboard):
    stuck(app, bus, conns)
    other = sign_in(dashboard.test_client(), "ada")
    response = officer.post("/requests/r-stuck/retry", data={"csrf": form_csrf(other)})
    assert response.status_code == 403
    assert request_row(app, "r-stuck").state == "needs_attention"


ACTIONS = [
    ("retry", {}),
    ("extend", {"due": "2027-01-10", "reason": "complex request"}),
    ("cancel", {"reason": "withdrawn"}),
    ("resend", {"event": "acknowledgement"}),
    ("close-concern", {"reply": "sorry"}),
    ("reveal", {"why": "curious"}),
]


@pytest.mark.parametrize(("action", "data"), ACTIONS, ids=[a for a, _ in ACTIONS])
def test_a_viewer_posting_an_action_directly_is_refused_with_403(
    app, bus, conns, viewer, action, data
):
    stuck(app, bus, conns)
    before = len(audit_actions(app, "request_state_changed"))
    response = viewer.post(f"/requests/r-stuck/{action}", data={"csrf": form_csrf(viewer), **data})
    assert response.status_code == 403
    assert b"needs the officer role" in response.data
    row = request_row(app, "r-stuck")
    assert row.state == "needs_attention" and row.extension_reason is None
    with app.sessions() as session:
        actions = set(session.execute(select(AuditRow.action)).scalars())
    assert not actions & {"request_retried", "deadline_extended", "email_resent", "pii_revealed"}
    assert len(audit_actions(app, "request_state_changed")) == before


def test_a_viewer_sees_no_action_forms(app, bus, conns, viewer):
    stuck(app, bus, conns)
    page = viewer.get("/requests/r-stuck").data
    for form in (b'id="retry"', b'id="extend"', b'id="cancel"', b'id="reveal"', b"Resend"):
        assert form not in page


def test_only_an_admin_manages_operators(app, officer, admin):
    assert officer.get("/operators").status_code == 403
    response = officer.post(
        "/operators",
        data={"csrf": form_csrf(officer), "name": "eve", "role": "admin", "password": "x" * 16},
    )
    assert response.status_code == 403
    assert "eve" not in [o.name for o in auth.list_operators(app)]
    response = admin.post(
        "/operators",
        data={
            "csrf": form_csrf(admin, "/operators"),
            "name": "otto",
            "role": "officer",
            "password": "otto-password-1",
        },
    )
    assert response.status_code == 302
    assert b"otto" in admin.get("/operators").data
    sign_in(admin.application.test_client(), "otto", "otto-password-1")
    created = audit_actions(app, "operator_created")
    assert [(r.actor, r.detail["operator"]) for r in created][-1] == ("ada", "otto")


def test_an_admin_cannot_create_an_operator_with_a_short_password(app, admin):
    response = admin.post(
        "/operators",
        data={
            "csrf": form_csrf(admin, "/operators"),
            "name": "otto",
            "role": "viewer",
            "password": "short",
        },
    )
    assert response.status_code == 400 and b"at least 12 characters" in response.data


def test_passwords_are_stored_as_salted_scrypt_hashes(app):
    auth.create_operator(app, "sam", "viewer", "same-password-1", actor="t", cost=FAST)
    auth.create_operator(app, "kim", "viewer", "same-password-1", actor="t", cost=FAST)
    with app.sessions() as session:
        hashes = dict(session.execute(select(OperatorRow.name, OperatorRow.password_hash)).all())
    assert hashes["sam"].startswith("scrypt$") and hashes["sam"] != hashes["kim"]
    assert "same-password-1" not in hashes["sam"]
    assert auth.check_password("same-password-1", hashes["sam"])
    assert not auth.check_password("same-password-2", hashes["sam"])
    assert not auth.check_password("same-password-1", "garbage")


def test_the_default_cost_is_memory_hard():
    stored = auth.hash_password("a-long-password")
    _, n, r, p, *_ = stored.split("$")
    owasp = {(2**17, 8, 1), (2**16, 8, 2), (2**15, 8, 3), (2**14, 8, 5), (2**13, 8, 10)}
    assert (int(n), int(r), int(p)) in owasp  # the cheat sheet's equivalent minimums
    assert auth.check_password("a-long-password", stored)


def test_sign_ins_and_admin_actions_keep_the_audit_chain_intact(app, admin, viewer):
    with app.sessions() as session:
        assert verify_chain(session).intact
    assert len(audit_actions(app, "operator_signed_in")) == 2


def test_next_after_sign_in_stays_on_this_site(dashboard):
    client = dashboard.test_client()
    page = client.get("/signin?next=//evil.example/x").data
    response = client.post(
        "/signin",
        data={
            "csrf": csrf_in(page),
            "name": "vic",
            "password": "viewer-password-1",
            "next": "//evil.example/x",
        },
    )
    assert response.location == "/"
