"""The dashboard's Flask app, built around one `App` (the composition root)."""

from __future__ import annotations

from datetime import datetime

import structlog
from flask import Flask, Response

from pipeline.bootstrap import App
from pipeline.dashboard.deadletters import DeadLetters
from pipeline.dashboard.metrics import make_registry
from pipeline.dashboard.queues import QueueReader
from pipeline.dashboard.views import EXTENSION, bp

log = structlog.get_logger()

DEFAULT_PORT = 8001


def _when(moment: datetime | str | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _day(moment: datetime | str | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.strftime("%Y-%m-%d")


def _ms(value: int) -> str:
    return f"{value} ms" if value < 1000 else f"{value / 1000:.1f} s"


def create_dashboard(app: App, *, secure_cookies: bool | None = None) -> Flask:
    """`secure_cookies` defaults to on in production, where the dashboard is behind TLS."""
    web = Flask(__name__)
    web.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    queues = QueueReader(app)
    web.extensions[EXTENSION] = {
        "app": app,
        "queues": queues,
        "dead_letters": DeadLetters(app, queues.client),
        "registry": make_registry(app, queues),
        "secure_cookies": app.settings.production if secure_cookies is None else secure_cookies,
    }
    web.jinja_env.filters["when"] = _when
    web.jinja_env.filters["day"] = _day
    web.jinja_env.filters["ms"] = _ms
    web.register_blueprint(bp)

    @web.after_request
    def _headers(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"  # pages may hold revealed PII
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        return response

    return web


def serve(app: App, host: str, port: int) -> None:
    from waitress import serve as waitress_serve

    log.info("dashboard_started", host=host, port=port)
    waitress_serve(create_dashboard(app), host=host, port=port, threads=8, ident="allego-privacy")
