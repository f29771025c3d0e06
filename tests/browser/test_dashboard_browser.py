"""The dashboard driven in headless Chromium (Debian's `chromium`, through Playwright),
served by a real waitress server over a real SQLite state database, with requests put in
their states by the pipeline itself (inline bus, memory connectors)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import select
from waitress.server import create_server

from connectors.memory import MemoryConnector
from pipeline.bootstrap import App, DramatiqBus, make_broker
from pipeline.dashboard.app import create_dashboard
from pipeline.dashboard.auth import create_operator
from pipeline.db import AuditRow
from pipeline.outbox import Envelope
from pipeline.topology import LOCATE_ACTOR, LOCATE_QUEUE
from tests.conftest import make_app
from tests.integration.dashboard.conftest import FAST, PASSWORDS, ROLES, stuck, submit
from tests.integration.support import EMAIL, NAME, QuietBus, request_row, stores

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "install Debian's chromium package (./dev services does)"
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Site:
    app: App
    bus: QuietBus
    conns: dict[str, MemoryConnector]
    url: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    bus, conns = QuietBus(), stores()
    app = make_app(
        f"sqlite:///{tmp_path / 'state.db'}",
        tmp_path / "data",
        bus=bus,
        connectors=conns,
        store_max_attempts=2,
        broker_url="redis://127.0.0.1:1/0",  # no broker: the queue panel says so
    )
    for name, role in ROLES.items():
        create_operator(app, name, role, PASSWORDS[name], actor="test", cost=FAST)
    stuck(app, bus, conns)
    submit(app, "concern", "r-concern", concern={"message": "Why do you keep emailing me?"})
    submit(app, "access", "r-wait", verified=False)
    submit(app, "opt_out", "r-done")
    bus.drain()
    try:
        with served(app) as url:
            yield Site(app, bus, conns, url)
    finally:
        app.close()


@contextmanager
def served(app: App) -> Iterator[str]:
    """The dashboard on a real waitress server; yields its URL."""
    server = create_server(create_dashboard(app), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        for channel in list(server._map.values()):
            channel.close()
        server.task_dispatcher.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


def sign_in(page: Page, site: Site, name: str) -> None:
    page.goto(f"{site.url}/")
    expect(page).to_have_url(f"{site.url}/signin?next=/?")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button:has-text('Sign in')")
    expect(page.locator("header .who")).to_contain_text(f"{name} · {ROLES[name]}")


def audit_of(app: App, action: str) -> list[AuditRow]:
    with app.sessions() as session:
        return list(session.execute(select(AuditRow).where(AuditRow.action == action)).scalars())


@pytest.mark.parametrize("name", sorted(ROLES))
def test_each_role_signs_in_and_sees_the_overview(page: Page, site: Site, name: str):
    sign_in(page, site, name)
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("#attention")).to_contain_text("r-stuck")
    expect(page.get_by_text("The broker does not answer")).to_be_visible()
    operators_link = page.locator("header a", has_text="Operators")
    expect(operators_link).to_have_count(1 if name == "ada" else 0)
    page.click("button:has-text('Sign out')")
    expect(page.locator("h1")).to_have_text("Sign in")


def test_a_viewer_sees_no_personal_data(page: Page, site: Site):
    sign_in(page, site, "vic")
    page.click("header a:has-text('Requests')")
    expect(page.locator("#requests")).to_contain_text("r-concern")
    for path in ("/requests", "/requests/r-concern", "/requests/r-stuck"):
        page.goto(site.url + path)
        text = page.content()
        assert EMAIL not in text and "Dana" not in text and "d***@" not in text, path
    expect(page.locator("#reveal")).to_have_count(0)
    expect(page.locator("#retry")).to_have_count(0)


def test_an_officer_sees_masked_data_then_reveals_it_with_a_reason(page: Page, site: Site):
    sign_in(page, site, "olivia")
    page.goto(f"{site.url}/requests")
    expect(page.locator("tr[data-request=r-concern]")).to_contain_text("d***@example.com · D. R.")
    page.click("a:has-text('r-concern')")
    expect(page.locator("#person")).to_contain_text("d***@example.com")
    assert EMAIL not in page.content()
    page.fill("#reveal input[name=why]", "the person phoned about this concern")
    page.click("#reveal button")
    expect(page.locator("#person")).to_contain_text(EMAIL)
    expect(page.locator("#person")).to_contain_text(NAME)
    expect(page.get_by_text("Why do you keep emailing me?")).to_be_visible()
    [entry] = audit_of(site.app, "pii_revealed")
    assert entry.actor == "olivia" and entry.request_id == "r-concern"
    assert entry.detail == {"reason": "the person phoned about this concern"}
    expect(page.locator("#audit")).to_contain_text("pii_revealed")
    page.goto(f"{site.url}/requests/r-concern")  # another view: masked again
    expect(page.locator("#person")).not_to_contain_text(EMAIL)


def test_an_officer_retries_a_failed_store_after_it_recovers(page: Page, site: Site):
    assert site.conns["crm"].down is False  # `stuck` failed it, then it came back
    sign_in(page, site, "olivia")
    page.goto(f"{site.url}/requests?state=needs_attention")
    page.click("a:has-text('r-stuck')")
    expect(page.locator("#stores")).to_contain_text("StoreUnavailable")
    page.click("#retry button")
    expect(page.locator("#done")).to_contain_text("Retry started")
    site.bus.drain()  # the worker's part
    page.reload()
    expect(page.locator("h1 .badge")).to_have_text("done")
    assert [e.actor for e in audit_of(site.app, "request_retried")] == ["olivia"]


def test_an_officer_extends_a_deadline(page: Page, site: Site):
    before = request_row(site.app, "r-wait").due_at
    sign_in(page, site, "olivia")
    page.goto(f"{site.url}/requests/r-wait")
    page.fill("#extend input[name=reason]", "the request covers many products")
    page.click("#extend button")
    expect(page.locator("#done")).to_contain_text("Deadline extended")
    expect(page.locator("#facts")).to_contain_text("the request covers many products")
    row = request_row(site.app, "r-wait")
    assert row.due_at > before and row.extension_reason == "the request covers many products"
    assert [e.actor for e in audit_of(site.app, "deadline_extended")] == ["olivia"]


def test_a_viewer_posting_retry_directly_over_http_is_refused(page: Page, site: Site):
    sign_in(page, site, "vic")
    page.goto(f"{site.url}/requests/r-stuck")
    csrf = page.locator("header input[name=csrf]").get_attribute("value")
    assert csrf
    response = page.context.request.post(
        f"{site.url}/requests/r-stuck/retry", form={"csrf": csrf}, max_redirects=0
    )
    assert response.status == 403
    assert "needs the officer role" in response.text()
    assert request_row(site.app, "r-stuck").state == "needs_attention"
    assert audit_of(site.app, "request_retried") == []


def test_the_request_list_marks_late_requests_in_red(page: Page, site: Site, tmp_path: Path):
    ago = lambda days: (datetime.now(UTC) - timedelta(days=days)).isoformat()  # noqa: E731
    submit(site.app, "access", "r-overdue", received_at=ago(40))
    submit(site.app, "erase", "r-at-risk", received_at=ago(27))
    submit(site.app, "correct", "r-ccpa", jurisdiction="ccpa", received_at=ago(3))
    site.bus.queue.clear()  # left as received
    sign_in(page, site, "olivia")
    page.goto(f"{site.url}/requests")
    red = "rgb(176, 0, 32)"
    expect(page.locator("tr[data-request=r-overdue] td.due")).to_have_css("color", red)
    expect(page.locator("tr[data-request=r-overdue] td.due")).to_contain_text("overdue")
    expect(page.locator("tr[data-request=r-at-risk] td.due")).to_contain_text("at risk")
    expect(page.locator("tr[data-request=r-ccpa] td.due")).not_to_contain_text("at risk")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("DASHBOARD_SCREENSHOT"):  # refresh docs/dashboard.png
        shutil.copyfile(shot, target)


@pytest.fixture
def redis_site(tmp_path: Path) -> Iterator[Site]:
    """A site whose broker is the real Redis (a namespace of its own), with one locate
    message a consumer gave up on in the dead letters."""
    bus, conns = QuietBus(), stores()
    app = make_app(
        f"sqlite:///{tmp_path / 'state.db'}",
        tmp_path / "data",
        bus=bus,
        connectors=conns,
        queue_namespace=f"privacy-browser-{uuid.uuid4().hex[:8]}",
    )
    for name, role in ROLES.items():
        create_operator(app, name, role, PASSWORDS[name], actor="test", cost=FAST)
    broker = make_broker(app.settings)
    DramatiqBus(broker).publish(
        Envelope(id=str(uuid.uuid4()), actor=LOCATE_ACTOR, queue=LOCATE_QUEUE, args=("r-dead",))
    )
    consumer = broker.consume(LOCATE_QUEUE, timeout=2000)
    consumer.nack(next(m for m in consumer if m is not None))
    consumer.close()
    try:
        with served(app) as url:
            yield Site(app, bus, conns, url)
    finally:
        keys = list(broker.client.scan_iter(f"{app.settings.queue_namespace}:*"))
        if keys:
            broker.client.delete(*keys)
        broker.close()
        app.close()


@pytest.mark.redis
def test_an_officer_replays_a_dead_letter(page: Page, redis_site: Site):
    ns = redis_site.app.settings.queue_namespace
    client = make_broker(redis_site.app.settings).client
    sign_in(page, redis_site, "olivia")
    page.click("header a:has-text('Dead letters')")
    row = page.locator("table.dead-letters tr[data-key]")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("locate_request")
    expect(row).to_contain_text("r-dead")
    row.locator("button:has-text('Replay')").click()
    expect(page.locator(".msg.ok")).to_contain_text("Replayed")
    expect(page.locator("table.dead-letters tr[data-key]")).to_have_count(0)
    assert client.zcard(f"{ns}:{LOCATE_QUEUE}.XQ") == 0
    (body,) = [json.loads(v) for v in client.hvals(f"{ns}:{LOCATE_QUEUE}.msgs")]
    assert body["actor_name"] == LOCATE_ACTOR and body["args"] == ["r-dead"]
    assert [e.actor for e in audit_of(redis_site.app, "dead_letter_replayed")] == ["olivia"]
