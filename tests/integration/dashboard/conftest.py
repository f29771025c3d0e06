"""Fixtures for the dashboard's tests: an app with requests in several states, three
operators (one per role), and Flask test clients signed in as each."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from connectors.memory import MemoryConnector
from pipeline import contract
from pipeline.bootstrap import App
from pipeline.dashboard.app import create_dashboard
from pipeline.dashboard.auth import ScryptCost, create_operator
from pipeline.intake import accept
from tests.conftest import make_app
from tests.integration.support import EMAIL, QuietBus, document, stores

FAST = ScryptCost(n=2**10, r=8, p=1)  # tests only: production hashes use DEFAULT_COST
PASSWORDS = {"vic": "viewer-password-1", "olivia": "officer-password-1", "ada": "admin-password-1"}
ROLES = {"vic": "viewer", "olivia": "officer", "ada": "admin"}


@pytest.fixture
def bus() -> QuietBus:
    return QuietBus()


@pytest.fixture
def conns() -> dict[str, MemoryConnector]:
    return stores()


@pytest.fixture
def app(state_url, tmp_path, bus, conns) -> Iterator[App]:
    application = make_app(
        state_url,
        tmp_path / "data",
        bus=bus,
        connectors=conns,
        store_max_attempts=2,
        queue_namespace=f"privacy-dash-{uuid.uuid4().hex[:8]}",
    )
    for name, role in ROLES.items():
        create_operator(application, name, role, PASSWORDS[name], actor="test", cost=FAST)
    yield application
    application.close()


@pytest.fixture
def dashboard(app) -> Flask:
    return create_dashboard(app)


def submit(app: App, kind: str, request_id: str, *, verified: bool = True, **extra: Any) -> None:
    """Accept a request; with a signed assertion it skips the confirmation email."""
    if verified:
        extra["verification"] = contract.sign_assertion(
            app.keys.intake_keys["allego-app"],
            request_id=request_id,
            kind=kind,
            email=EMAIL,
            system="allego-app",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
    assert accept(app, document(kind, request_id, **extra)).status == "accepted"


def stuck(app: App, bus: QuietBus, conns, request_id: str = "r-stuck") -> None:
    """An erasure the crm store keeps failing: it needs attention."""
    conns["crm"].down = True
    submit(app, "erase", request_id)
    bus.drain()
    conns["crm"].down = False


def csrf_in(page: bytes) -> str:
    match = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert match, "the page has a form with a CSRF token"
    return match.group(1).decode()


def signin_csrf_in(page: bytes) -> str:
    """The sign-in form's own token (a signed-in page also has the sign-out form's)."""
    match = re.search(
        rb'action="/signin"[^>]*>\s*<input type="hidden" name="csrf" value="([^"]+)"', page
    )
    assert match, "the page has the sign-in form"
    return match.group(1).decode()


def sign_in(client: FlaskClient, name: str, password: str | None = None) -> FlaskClient:
    page = client.get("/signin").data
    response = client.post(
        "/signin",
        data={"csrf": signin_csrf_in(page), "name": name, "password": password or PASSWORDS[name]},
    )
    assert response.status_code == 302, response.data
    return client


@pytest.fixture
def viewer(dashboard) -> FlaskClient:
    return sign_in(dashboard.test_client(), "vic")


@pytest.fixture
def officer(dashboard) -> FlaskClient:
    return sign_in(dashboard.test_client(), "olivia")


@pytest.fixture
def admin(dashboard) -> FlaskClient:
    return sign_in(dashboard.test_client(), "ada")


def form_csrf(client: FlaskClient, path: str = "/") -> str:
    """The session's CSRF token, as a page the client may open shows it."""
    return csrf_in(client.get(path).data)
