"""The person-facing web process (`privacy web`): confirm a request, download an export.

Opening a verification link only shows a page; the page's button POSTs, with a CSRF
token bound to the link, and that confirms. Mail scanners that follow links confirm
nothing. Export links are signed, expiring and checked against the export row, so a
revoked or expired export is never served. Both kinds of page are rate limited per client
address and per person (`pipeline.ratelimit`); a limited caller gets a 429 page with
Retry-After, and the attempt changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from pathlib import Path

import structlog
from flask import Flask, Response, render_template, request
from sqlalchemy import select

from pipeline import archive, audit
from pipeline.bootstrap import App
from pipeline.crypto import BadSignature, Expired
from pipeline.db import ExportRow, transaction, utcnow
from pipeline.notify import DOWNLOAD_PURPOSE
from pipeline.ratelimit import WebLimits
from pipeline.verification import LinkRefused, confirm, inspect, record_failed_attempt

log = structlog.get_logger()
_CSRF_COOKIE = "privacy_csrf"
_STATUS = {"invalid": 404, "expired": 410, "used": 409}


def _csrf_for(app: App, nonce: str, token: str) -> str:
    return hmac.new(
        app.keys.signing_key, f"csrf|{nonce}|{token}".encode(), hashlib.sha256
    ).hexdigest()


def create_app(app: App) -> Flask:
    web = Flask(__name__)
    web.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    limits = WebLimits(app, web)

    @web.after_request
    def _headers(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"  # tokens live in the URL
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
        )
        return response

    def refused(exc: LinkRefused) -> tuple[str, int]:
        return render_template("web/refused.html", kind=exc.kind), _STATUS[exc.kind]

    @web.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @web.get("/verify/<token>")
    @limits.verify
    def verify_page(token: str) -> Response | tuple[str, int]:
        try:
            inspect(app, token)
        except LinkRefused as exc:
            return refused(exc)
        nonce = secrets.token_urlsafe(16)
        response = Response(render_template("web/confirm.html", csrf=_csrf_for(app, nonce, token)))
        response.set_cookie(
            _CSRF_COOKIE,
            nonce,
            httponly=True,
            samesite="Strict",
            secure=app.settings.base_url.startswith("https"),
            max_age=3600,
        )
        return response

    @web.post("/verify/<token>")
    @limits.verify
    def verify_confirm(token: str) -> tuple[str, int]:
        nonce = request.cookies.get(_CSRF_COOKIE, "")
        sent = request.form.get("csrf", "")
        if not nonce or not hmac.compare_digest(sent, _csrf_for(app, nonce, token)):
            record_failed_attempt(app, token)
            return render_template("web/refused.html", kind="csrf"), 403
        try:
            confirm(app, token)
        except LinkRefused as exc:
            return refused(exc)
        return render_template("web/confirmed.html"), 200

    @web.get("/download/<token>")
    @limits.download
    def download(token: str) -> Response | tuple[str, int]:
        try:
            export_id = app.keys.signer(DOWNLOAD_PURPOSE).unsign(token)
        except Expired:
            return render_template("web/refused.html", kind="expired"), 410
        except BadSignature:
            return render_template("web/refused.html", kind="invalid"), 404
        with transaction(app.sessions) as session:
            export = session.execute(select(ExportRow).where(ExportRow.id == export_id)).scalar()
            if export is None or export.revoked_at is not None:
                return render_template("web/refused.html", kind="invalid"), 404
            if export.expires_at <= utcnow():
                return render_template("web/refused.html", kind="expired"), 410
            export.downloads += 1
            audit.record(
                session, "export_downloaded", request_id=export.request_id, export_id=export.id
            )
            path, request_id = export.path, export.request_id
        chunks: Iterator[bytes] = archive.open_archive(app, Path(path))
        log.info("export_downloaded", request_id=request_id)
        return Response(
            chunks,
            mimetype="application/zip",
            headers={"Content-Disposition": f'attachment; filename="allego-data-{request_id}.zip"'},
        )

    @web.errorhandler(429)
    def too_many(_exc: Exception) -> Response:
        wait = limits.retry_after()
        response = Response(render_template("web/limited.html", wait=wait), status=429)
        response.headers["Retry-After"] = str(wait)
        return response

    @web.errorhandler(404)
    def not_found(_exc: Exception) -> tuple[str, int]:
        return render_template("web/refused.html", kind="invalid"), 404

    return web


def serve(app: App) -> None:
    from waitress import serve as waitress_serve

    log.info("web_started", host=app.settings.web_host, port=app.settings.web_port)
    waitress_serve(
        create_app(app),
        host=app.settings.web_host,
        port=app.settings.web_port,
        threads=8,
        ident="allego-privacy",
    )
