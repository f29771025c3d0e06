"""The request pages: PII masked by default and revealed only with a recorded reason;
each action calls the pipeline's own operation with the operator as actor."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from pipeline.dashboard.overview import Cursor, RequestFilter, list_requests
from pipeline.db import AuditRow, CaseRow
from tests.integration.dashboard.conftest import form_csrf, stuck, submit
from tests.integration.support import EMAIL, NAME, notifications, request_row


def audit_of(app, action: str) -> list[AuditRow]:
    with app.sessions() as session:
        return list(session.execute(select(AuditRow).where(AuditRow.action == action)).scalars())


@pytest.fixture
def some(app, bus, conns):
    """A stuck erasure, an open concern, a request waiting for the person to confirm."""
    stuck(app, bus, conns)
    submit(app, "concern", "r-concern", concern={"message": "Why do you keep emailing me?"})
    submit(app, "access", "r-wait", verified=False)
    bus.drain()
    assert request_row(app, "r-wait").state == "awaiting_verification"


PAGES = ["/", "/requests", "/requests/r-stuck", "/requests/r-concern", "/requests/r-wait"]


@pytest.mark.usefixtures("some")
def test_a_viewer_sees_flow_and_counts_but_no_personal_data_not_even_masked(viewer):
    for path in PAGES:
        page = viewer.get(path).data.decode()
        assert EMAIL not in page and "Dana" not in page, path
        assert "d***@" not in page and "D. R." not in page and "emailing me" not in page, path
    listing = viewer.get("/requests").data.decode()
    assert "person (keyed hash)" in listing and "r-stuck" in listing


@pytest.mark.usefixtures("some")
def test_an_officer_sees_masked_personal_data_only(officer):
    for path in PAGES:
        page = officer.get(path).data.decode()
        assert EMAIL not in page and NAME not in page and "emailing me" not in page, path
    assert "d***@example.com · D. R." in officer.get("/requests").data.decode()
    assert "d***@example.com · D. R. · ***00" in officer.get("/requests/r-stuck").data.decode()


@pytest.mark.usefixtures("some")
def test_reveal_needs_a_reason_and_records_who_and_why(app, officer):
    csrf = form_csrf(officer)
    response = officer.post("/requests/r-concern/reveal", data={"csrf": csrf, "why": "  "})
    assert response.status_code == 400 and EMAIL.encode() not in response.data
    assert audit_of(app, "pii_revealed") == []

    why = "the person called asking about this concern"
    response = officer.post("/requests/r-concern/reveal", data={"csrf": csrf, "why": why})
    page = response.data.decode()
    assert response.status_code == 200
    assert EMAIL in page and NAME in page and "Why do you keep emailing me?" in page
    assert response.headers["Cache-Control"] == "no-store"
    [entry] = audit_of(app, "pii_revealed")
    assert (entry.actor, entry.request_id, entry.detail) == ("olivia", "r-concern", {"reason": why})
    assert EMAIL not in officer.get("/requests/r-concern").data.decode()  # that view only


@pytest.mark.usefixtures("some")
def test_retry_from_the_dashboard_resumes_the_request_as_the_operator(app, bus, officer):
    response = officer.post("/requests/r-stuck/retry", data={"csrf": form_csrf(officer)})
    assert response.status_code == 302 and response.location.endswith("done=retried")
    assert request_row(app, "r-stuck").state == "locating"
    assert [e.actor for e in audit_of(app, "request_retried")] == ["olivia"]
    bus.drain()
    assert request_row(app, "r-stuck").state == "done"
    assert b"Retry started" in officer.get(response.location).data


@pytest.mark.usefixtures("some")
def test_retry_of_a_request_that_is_not_stuck_says_why_not(app, officer):
    response = officer.post("/requests/r-wait/retry", data={"csrf": form_csrf(officer)})
    assert response.status_code == 409 and b"not needing attention" in response.data
    assert request_row(app, "r-wait").state == "awaiting_verification"


@pytest.mark.usefixtures("some")
def test_extend_moves_the_deadline_tells_the_person_and_records_the_operator(app, officer):
    old = request_row(app, "r-wait").due_at
    new = (old + timedelta(days=20)).date()
    response = officer.post(
        "/requests/r-wait/extend",
        data={"csrf": form_csrf(officer), "due": new.isoformat(), "reason": "many stores"},
    )
    assert response.status_code == 302
    row = request_row(app, "r-wait")
    assert row.due_at == datetime.combine(new, datetime.min.time(), UTC)
    assert row.extension_reason == "many stores"
    [entry] = audit_of(app, "deadline_extended")
    assert entry.actor == "olivia" and entry.detail["reason"] == "many stores"
    assert any(n.template == "extension" for n in notifications(app, "r-wait"))


@pytest.mark.usefixtures("some")
def test_an_extension_beyond_the_law_is_refused_with_the_limit(app, officer):
    far = (request_row(app, "r-wait").received_at + timedelta(days=200)).date()
    response = officer.post(
        "/requests/r-wait/extend",
        data={"csrf": form_csrf(officer), "due": far.isoformat(), "reason": "slow"},
    )
    assert response.status_code == 409 and b"the law allows extending to" in response.data
    assert request_row(app, "r-wait").extension_reason is None


@pytest.mark.usefixtures("some")
def test_an_extension_without_a_reason_is_refused(app, officer):
    response = officer.post(
        "/requests/r-wait/extend", data={"csrf": form_csrf(officer), "due": "2027-01-01"}
    )
    assert response.status_code == 409 and b"A reason is required" in response.data


@pytest.mark.usefixtures("some")
def test_cancel_records_the_reason_and_the_operator(app, admin):
    response = admin.post(
        "/requests/r-stuck/cancel", data={"csrf": form_csrf(admin), "reason": "withdrawn by phone"}
    )
    assert response.status_code == 302
    row = request_row(app, "r-stuck")
    assert (row.state, row.state_reason) == ("cancelled", "withdrawn by phone")
    [entry] = [e for e in audit_of(app, "request_state_changed") if e.actor == "ada"]
    assert entry.detail["to_state"] == "cancelled"


@pytest.mark.usefixtures("some")
def test_resend_queues_the_email_again_as_a_new_event(app, officer):
    before = len(notifications(app, "r-wait"))
    response = officer.post(
        "/requests/r-wait/resend", data={"csrf": form_csrf(officer), "event": "verification"}
    )
    assert response.status_code == 302
    assert len(notifications(app, "r-wait")) == before + 1
    assert [(e.actor, e.detail["event"]) for e in audit_of(app, "email_resent")] == [
        ("olivia", "verification")
    ]


@pytest.mark.usefixtures("some")
def test_close_concern_closes_the_case_and_queues_the_reply(app, officer):
    response = officer.post(
        "/requests/r-concern/close-concern",
        data={"csrf": form_csrf(officer), "reply": "We have stopped the emails."},
    )
    assert response.status_code == 302
    with app.sessions() as session:
        case = session.execute(select(CaseRow)).scalar_one()
    assert case.status == "closed"
    assert [e.actor for e in audit_of(app, "case_closed")] == ["olivia"]
    assert any(n.event == "case_reply" for n in notifications(app, "r-concern"))
    assert b'id="close-concern"' not in officer.get("/requests/r-concern").data


def test_an_unknown_request_is_not_found(officer):
    assert officer.get("/requests/nope").status_code == 404


@pytest.mark.usefixtures("some")
def test_the_request_page_shows_the_timeline_stores_emails_and_audit(officer):
    page = officer.get("/requests/r-stuck").data.decode()
    assert "needs_attention" in page and "StoreUnavailable" in page
    assert 'id="stores"' in page and "failed" in page
    assert 'id="audit"' in page and "request_state_changed" in page
    assert "acknowledgement" in page  # the email


# -- the list ------------------------------------------------------------------------------


def received(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat()


@pytest.fixture
def many(app, bus):
    """Requests of several kinds and deadlines, left in `received` (not drained)."""
    submit(app, "access", "a-old", received_at=received(40))  # overdue
    submit(app, "erase", "e-soon", received_at=received(27))  # due within 7 days
    submit(app, "opt_out", "o-ccpa", jurisdiction="ccpa", received_at=received(1))
    for i in range(5):
        submit(app, "access", f"a-{i}", received_at=received(2 + i / 10))
    bus.queue.clear()  # their next messages are dropped: they stay `received`


def test_overdue_and_at_risk_requests_are_marked(app, many, viewer):
    page = viewer.get("/requests").data.decode()
    assert 'class="overdue" data-request="a-old"' in page
    assert 'class="at_risk" data-request="e-soon"' in page
    assert 'class="" data-request="a-0"' in page
    home = viewer.get("/").data.decode()
    assert "Overdue<b>1</b>" in home and "At risk (due in 7 days)<b>1</b>" in home


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"type": "erase"}, {"e-soon"}),
        ({"jurisdiction": "ccpa"}, {"o-ccpa"}),
        ({"state": "received", "type": "opt_out"}, {"o-ccpa"}),
        ({"state": "done"}, set()),
    ],
)
def test_the_list_filters(app, many, viewer, args, expected):
    page = viewer.get("/requests", query_string=args).data.decode()
    shown = {
        r for r in ("a-old", "e-soon", "o-ccpa", "a-0", "a-4") if f'data-request="{r}"' in page
    }
    assert shown == expected


def test_the_list_filters_by_due_date(app, many, viewer):
    soon = (datetime.now(UTC) + timedelta(days=8)).date().isoformat()
    page = viewer.get("/requests", query_string={"due_before": soon}).data.decode()
    assert 'data-request="a-old"' in page and 'data-request="e-soon"' in page
    assert 'data-request="a-0"' not in page


def test_the_list_filters_by_store(app, bus, conns, viewer):
    # waits for the person to confirm a link, so no verify batch takes it on
    submit(app, "access", "a-waiting", verified=False)
    bus.queue.clear()
    stuck(app, bus, conns)  # the only request with a crm store task
    page = viewer.get("/requests", query_string={"store": "crm"}).data.decode()
    assert 'data-request="r-stuck"' in page and 'data-request="a-waiting"' not in page
    assert 'data-request="a-waiting"' in viewer.get("/requests").data.decode()


def test_a_bad_filter_is_refused(viewer):
    assert viewer.get("/requests?state=nonsense").status_code == 400
    assert viewer.get("/requests?due_before=tomorrow").status_code == 400
    assert viewer.get("/requests?after=garbage").status_code == 400


def test_pages_follow_each_other_without_gaps_or_repeats(app, many):
    seen: list[str] = []
    after: Cursor | None = None
    while True:
        page = list_requests(app, RequestFilter(), after=after, limit=3)
        seen += [r.id for r in page.items]
        if page.next is None:
            break
        after = Cursor.decode(page.next.encode())
    assert len(seen) == 8 and len(set(seen)) == 8
    assert seen[0] == "a-old" and seen[1] == "e-soon"  # soonest due first


def test_the_next_page_link_works_over_http(app, many, viewer, monkeypatch):
    monkeypatch.setattr("pipeline.dashboard.overview.PAGE_SIZE", 5)
    first = viewer.get("/requests").data.decode()
    assert first.count("data-request=") == 5
    href = re.search(r'id="next-page" href="([^"]+)"', first).group(1).replace("&amp;", "&")
    second = viewer.get(href).data.decode()
    assert second.count("data-request=") == 3


def test_the_list_never_reads_ciphertexts_for_a_viewer(app, many, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "pipeline.dashboard.overview._decrypt_subject", lambda *a: calls.append(a) or {}
    )
    list_requests(app, RequestFilter(), masked_pii=False)
    assert calls == []
    list_requests(app, RequestFilter(), masked_pii=True, limit=3)
    assert len(calls) == 3  # only the rows on the page
