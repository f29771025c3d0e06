"""Hostile callers: rate limits per client address and per person on the verification
pages and the export download (counted in the real Redis), and a per-address limit on
confirmation mails so that nobody can use us as a mail bomb, without losing a request."""

from __future__ import annotations

import re
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import select

from pipeline import reconcile, topology, verification
from pipeline.db import AuditRow, ExportRow, NotificationRow, VerificationRow
from pipeline.errors import ConfigurationError
from pipeline.intake import accept
from pipeline.settings import Settings
from pipeline.web import create_app
from tests.conftest import make_app
from tests.integration.support import (
    EMAIL,
    QuietBus,
    document,
    mail_context,
    notifications,
    request_row,
    stores,
    verification_token,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
OTHER_EMAIL = "sam.okafor@example.com"
ALICE = "203.0.113.7"
BOB = "198.51.100.20"

pytestmark = pytest.mark.redis


@pytest.fixture
def namespace():
    """A queue namespace (and so a rate-limit key prefix) of this test's own, removed after."""
    name = f"test-limits-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def bus():
    return QuietBus()


@pytest.fixture
def make(state_url, tmp_path, bus, namespace):
    """An app on the real state database and Redis, with this test's limits."""
    made = []

    def build(**limits):
        app = make_app(
            state_url,
            tmp_path / f"data{len(made)}",
            bus=bus,
            connectors=stores(),
            broker_url=REDIS_URL,
            queue_namespace=namespace,
            **limits,
        )
        made.append(app)
        return app

    yield build
    for app in made:
        app.close()


def awaiting(app, bus, request_id: str, email: str = EMAIL, **start) -> str:
    doc = document("access", request_id)
    doc["subject"]["email"] = email
    assert accept(app, doc).status == "accepted"
    verification.start(app, request_id, **start)
    bus.queue.clear()
    return verification_token(app, request_id)


def csrf_of(page: bytes) -> str:
    match = re.search(rb'name="csrf" value="([0-9a-f]+)"', page)
    assert match
    return match.group(1).decode()


def get(client, path: str, addr: str, **headers):
    return client.get(path, environ_base={"REMOTE_ADDR": addr}, headers=headers)


def link_row(app, request_id: str) -> VerificationRow:
    with app.sessions() as session:
        return session.execute(
            select(VerificationRow).where(VerificationRow.request_id == request_id)
        ).scalar_one()


def assert_limited(response) -> None:
    assert response.status_code == 429
    assert b"Too many attempts" in response.data
    assert b"Nothing was changed" in response.data
    wait = int(response.headers["Retry-After"])
    assert 1 <= wait <= 61  # a minute, rounded up
    assert response.headers["Cache-Control"] == "no-store"


def rate_limit_keys(namespace: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [k.decode() for k in client.scan_iter(f"{namespace}:ratelimit*")]
    finally:
        client.close()


# -- verification pages ---------------------------------------------------------------


def test_an_address_guessing_links_is_limited_and_other_addresses_are_not(make, bus):
    app = make(verify_limit_per_address="5/minute", verify_limit_per_email="100/minute")
    token = awaiting(app, bus, "r-1")
    client = create_app(app).test_client()
    for n in range(5):
        assert get(client, f"/verify/guess-{n}", ALICE).status_code == 404
    assert_limited(get(client, "/verify/guess-5", ALICE))
    assert_limited(get(client, f"/verify/{token}", ALICE))  # even a valid link, from there
    assert get(client, f"/verify/{token}", BOB).status_code == 200


def test_a_limited_confirmation_changes_nothing(make, bus):
    app = make(verify_limit_per_address="3/minute", verify_limit_per_email="100/minute")
    token = awaiting(app, bus, "r-1")
    client = create_app(app).test_client()
    csrf = csrf_of(get(client, f"/verify/{token}", ALICE).data)
    wrong = client.post(
        f"/verify/{token}", data={"csrf": "0" * 64}, environ_base={"REMOTE_ADDR": ALICE}
    )
    assert wrong.status_code == 403
    assert link_row(app, "r-1").attempts == 1
    assert get(client, "/verify/guess", ALICE).status_code == 404  # the budget is now spent
    for csrf_sent in ("0" * 64, csrf):
        response = client.post(
            f"/verify/{token}", data={"csrf": csrf_sent}, environ_base={"REMOTE_ADDR": ALICE}
        )
        assert_limited(response)
    row = link_row(app, "r-1")
    assert (row.attempts, row.used_at) == (1, None)  # not counted as a failed attempt
    assert request_row(app, "r-1").state == "awaiting_verification"
    assert not bus.queue
    with app.sessions() as session:
        actions = list(session.execute(select(AuditRow.action)).scalars())
    assert "identity_verified" not in actions and "verification_locked" not in actions


def test_a_link_is_limited_per_person_from_any_address(make, bus):
    app = make(verify_limit_per_address="100/minute", verify_limit_per_email="3/minute")
    token = awaiting(app, bus, "r-1")
    same_person = awaiting(app, bus, "r-2")
    other_person = awaiting(app, bus, "r-3", email=OTHER_EMAIL)
    client = create_app(app).test_client()
    for n in range(3):
        assert get(client, f"/verify/{token}", f"192.0.2.{n + 1}").status_code == 200
    assert_limited(get(client, f"/verify/{token}", "192.0.2.50"))
    # the budget is the person's (the email the link is bound to), not the link's
    assert_limited(get(client, f"/verify/{same_person}", "192.0.2.51"))
    assert get(client, f"/verify/{other_person}", "192.0.2.52").status_code == 200
    # a link that names no request has no person: only the address budget applies
    assert get(client, "/verify/guess", "192.0.2.53").status_code == 404


def test_the_page_and_its_button_share_one_budget(make, bus):
    app = make(verify_limit_per_address="100/minute", verify_limit_per_email="2/minute")
    token = awaiting(app, bus, "r-1")
    client = create_app(app).test_client()
    csrf = csrf_of(get(client, f"/verify/{token}", ALICE).data)
    assert get(client, f"/verify/{token}", ALICE).status_code == 200
    response = client.post(
        f"/verify/{token}", data={"csrf": csrf}, environ_base={"REMOTE_ADDR": ALICE}
    )
    assert_limited(response)
    assert request_row(app, "r-1").state == "awaiting_verification"


def test_counters_live_in_redis_under_keyed_hashes_only(make, bus, namespace):
    app = make()
    token = awaiting(app, bus, "r-1")
    client = create_app(app).test_client()
    assert get(client, f"/verify/{token}", ALICE).status_code == 200
    keys = rate_limit_keys(namespace)
    assert any("verify-address" in k for k in keys)
    assert any("verify-email" in k for k in keys)
    address_hash = app.blind.of("ratelimit-address", ALICE)
    assert any(address_hash in k for k in keys)
    blob = " ".join(keys)
    for secret in (EMAIL, EMAIL.split("@")[0], ALICE, token, token.split(".")[0], "r-1"):
        assert secret not in blob
    # a second app on the same Redis (another web process) sees the same counts
    other = create_app(app).test_client()
    app2_budget = [get(other, "/verify/guess", ALICE).status_code for _ in range(29)]
    assert app2_budget == [404] * 29
    assert_limited(get(client, "/verify/guess", ALICE))


def test_forwarded_for_is_ignored_unless_proxies_are_trusted(make, bus):
    app = make(verify_limit_per_address="2/minute")
    client = create_app(app).test_client()
    for n in range(2):
        forwarded = {"X-Forwarded-For": f"10.0.0.{n}"}
        assert get(client, "/verify/x", ALICE, **forwarded).status_code == 404
    # a caller cannot buy a new budget by writing a new X-Forwarded-For
    assert_limited(get(client, "/verify/x", ALICE, **{"X-Forwarded-For": "10.0.0.99"}))

    behind = make(verify_limit_per_address="2/minute", trusted_proxies=1)
    proxied = create_app(behind).test_client()
    proxy = "127.0.0.1"
    for _ in range(2):
        response = get(proxied, "/verify/x", proxy, **{"X-Forwarded-For": ALICE})
        assert response.status_code == 404
    assert_limited(get(proxied, "/verify/x", proxy, **{"X-Forwarded-For": ALICE}))
    # behind the proxy, each client has its own budget: the proxy's address is not one
    assert get(proxied, "/verify/x", proxy, **{"X-Forwarded-For": BOB}).status_code == 404
    # only the entry our one proxy appended counts: what the client wrote before it does not
    spoofed = get(proxied, "/verify/x", proxy, **{"X-Forwarded-For": f"10.9.9.9, {ALICE}"})
    assert_limited(spoofed)


def test_an_ipv6_host_counts_by_its_slash_64(make, bus):
    app = make(verify_limit_per_address="2/minute")
    client = create_app(app).test_client()
    assert get(client, "/verify/x", "2001:db8:1:2::1").status_code == 404
    assert get(client, "/verify/x", "2001:db8:1:2::ffff").status_code == 404
    assert_limited(get(client, "/verify/x", "2001:db8:1:2:abcd::7"))
    assert get(client, "/verify/x", "2001:db8:1:3::1").status_code == 404


def test_with_redis_unreachable_the_pages_work_and_limits_hold_in_memory(make, bus):
    app = make(verify_limit_per_address="3/minute", rate_limit_storage_url="redis://127.0.0.1:1/0")
    token = awaiting(app, bus, "r-1")
    client = create_app(app).test_client()
    csrf = csrf_of(get(client, f"/verify/{token}", ALICE).data)
    response = client.post(
        f"/verify/{token}", data={"csrf": csrf}, environ_base={"REMOTE_ADDR": ALICE}
    )
    assert response.status_code == 200
    assert request_row(app, "r-1").state == "verified"
    assert get(client, "/verify/x", ALICE).status_code == 404
    assert_limited(get(client, "/verify/x", ALICE))


def test_a_limit_that_does_not_parse_is_refused_at_start_naming_its_variable(make):
    app = make(download_limit_per_email="lots")
    with pytest.raises(ConfigurationError, match="PRIVACY_DOWNLOAD_LIMIT_PER_EMAIL"):
        create_app(app)


def test_limits_are_read_from_the_environment():
    settings = Settings.from_env(
        {
            "PRIVACY_VERIFY_LIMIT_PER_ADDRESS": "5/minute;50/hour",
            "PRIVACY_VERIFY_LIMIT_PER_EMAIL": "3/minute",
            "PRIVACY_DOWNLOAD_LIMIT_PER_ADDRESS": "7/minute",
            "PRIVACY_DOWNLOAD_LIMIT_PER_EMAIL": "2/hour",
            "PRIVACY_RATE_LIMIT_STORAGE_URL": "redis://127.0.0.1:6379/3",
            "PRIVACY_TRUSTED_PROXIES": "2",
            "PRIVACY_VERIFY_MAILS_PER_EMAIL": "4",
            "PRIVACY_VERIFY_MAIL_WINDOW": "3600",
        }
    )
    assert (settings.verify_limit_per_address, settings.verify_limit_per_email) == (
        "5/minute;50/hour",
        "3/minute",
    )
    assert (settings.download_limit_per_address, settings.download_limit_per_email) == (
        "7/minute",
        "2/hour",
    )
    assert settings.rate_limit_storage_url == "redis://127.0.0.1:6379/3"
    assert settings.trusted_proxies == 2
    assert (settings.verify_mails_per_email, settings.verify_mail_window_seconds) == (4, 3600)
    defaults = Settings()
    assert defaults.trusted_proxies == 0  # X-Forwarded-For is not believed by default


# -- download -------------------------------------------------------------------------


def finished_access(app, bus, request_id: str = "r-1") -> str:
    token = awaiting(app, bus, request_id)
    verification.confirm(app, token)
    bus.drain()
    assert request_row(app, request_id).state == "done"
    with app.sessions() as session:
        note = session.execute(
            select(NotificationRow).where(
                NotificationRow.event == "outcome", NotificationRow.request_id == request_id
            )
        ).scalar_one()
    return "/download/" + mail_context(app, note)["link"].rsplit("/download/", 1)[1]


def downloads(app) -> int:
    with app.sessions() as session:
        return session.execute(select(ExportRow.downloads)).scalar_one()


def test_a_download_link_is_limited_per_person_and_the_limited_attempt_counts_nothing(make, bus):
    app = make(download_limit_per_address="100/minute", download_limit_per_email="2/hour")
    path = finished_access(app, bus)
    client = create_app(app).test_client()
    assert get(client, path, ALICE).status_code == 200
    assert get(client, path, BOB).status_code == 200
    limited = get(client, path, "192.0.2.9")
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert b"Too many attempts" in limited.data
    assert downloads(app) == 2
    with app.sessions() as session:
        audited = session.execute(
            select(AuditRow).where(AuditRow.action == "export_downloaded")
        ).all()
    assert len(audited) == 2


def test_an_address_guessing_download_links_is_limited(make, bus):
    app = make(download_limit_per_address="4/minute")
    path = finished_access(app, bus)
    client = create_app(app).test_client()
    for n in range(4):
        assert get(client, f"/download/guess-{n}", ALICE).status_code == 404
    assert_limited(get(client, path, ALICE))
    assert downloads(app) == 0
    assert get(client, path, BOB).status_code == 200
    # the download budget is apart from the verification budget
    assert get(client, "/verify/guess", ALICE).status_code == 404


# -- confirmation mails -----------------------------------------------------------------


def verification_mails(app) -> list[NotificationRow]:
    return [n for n in notifications(app) if n.event == "verification"]


def submit(app, request_id: str, email: str = EMAIL, kind: str = "access", **start) -> None:
    doc = document(kind, request_id)
    doc["subject"]["email"] = email
    assert accept(app, doc).status == "accepted"
    verification.start(app, request_id, **start)


def test_many_requests_for_one_address_mail_at_most_the_limit_and_lose_none(make, bus):
    app = make(verify_mails_per_email=3)
    for n in range(7):
        submit(app, f"r-{n}")
    mailed = {n.request_id for n in verification_mails(app)}
    assert mailed == {"r-0", "r-1", "r-2"}
    for n in range(3, 7):
        row = request_row(app, f"r-{n}")
        assert row.state == "received"  # kept, not dropped, not failed
        assert row.state_reason == verification.MAIL_DEFERRED_REASON
    # a redelivered verify message does nothing more: no mail, one audit entry each
    verification.start(app, "r-5")
    assert len(verification_mails(app)) == 3
    with app.sessions() as session:
        deferred = session.execute(
            select(AuditRow.request_id).where(AuditRow.action == "verification_mail_deferred")
        ).all()
    assert sorted(r for (r,) in deferred) == ["r-3", "r-4", "r-5", "r-6"]
    # another address is not held back by this one's flood
    submit(app, "other", email=OTHER_EMAIL)
    assert request_row(app, "other").state == "awaiting_verification"
    # requests that need no confirmation mail are never held back
    submit(app, "optout", kind="opt_out")
    assert request_row(app, "optout").state == "verified"


def test_a_deferred_request_is_mailed_when_the_window_has_room(make, bus):
    app = make(verify_mails_per_email=2, verify_mail_window_seconds=3600)
    start = datetime.now(UTC)
    submit(app, "r-0", now=start)
    submit(app, "r-1", now=start + timedelta(minutes=10))
    submit(app, "r-2", now=start + timedelta(minutes=20))
    assert request_row(app, "r-2").state == "received"
    verification.start(app, "r-2", now=start + timedelta(minutes=59))
    assert request_row(app, "r-2").state == "received"  # r-0's link is still in the window
    verification.start(app, "r-2", now=start + timedelta(minutes=61))
    row = request_row(app, "r-2")
    assert row.state == "awaiting_verification"
    assert row.state_reason != verification.MAIL_DEFERRED_REASON
    assert {n.request_id for n in verification_mails(app)} == {"r-0", "r-1", "r-2"}


def test_a_person_who_answers_is_not_held_back_and_the_reconciler_brings_the_rest(make, bus):
    app = make(verify_mails_per_email=2)
    submit(app, "r-0")
    submit(app, "r-1")
    submit(app, "r-2")
    assert request_row(app, "r-2").state == "received"
    verification.confirm(app, verification_token(app, "r-0"))  # the person answers one
    bus.queue.clear()
    # the scheduler's reconciler re-sends the verify message of a request left in received
    later = datetime.now(UTC) + timedelta(seconds=app.settings.stall_seconds + 1)
    assert reconcile.rekick_stalled(app, later) >= 1
    assert (topology.VERIFY_ACTOR, ("r-2",)) in [(e.actor, e.args) for e in bus.queue]
    bus.queue = deque(e for e in bus.queue if e.actor == topology.VERIFY_ACTOR)
    bus.drain()
    assert request_row(app, "r-2").state == "awaiting_verification"
    assert len(verification_mails(app)) == 3
