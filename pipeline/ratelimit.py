"""Rate limits on the person-facing pages: per client address and per person.

Links are signed and bound to one request, so guessing one is hopeless; the limits are
there so that nobody can hammer the pages (replaying a link, scanning for tokens, pulling
an archive again and again) and so that a leaked link cannot be used without bound.

Every page that takes a link has two budgets: one per client address, and one per person,
the person being the email of the request the link is bound to (an invalid or expired
link has no person: only the address budget applies, and the page refuses it anyway).
The budgets are checked before the view runs, so a limited attempt reads and changes
nothing: no failed-attempt count, no download count, no audit entry.

Counting is Flask-Limiter over `limits`, in the broker's Redis under
`<namespace>:ratelimit`, with a moving window. Keys are keyed hashes (`BlindIndex`): no
address, email or token is ever a Redis key. If Redis cannot be reached the limits go on
in this process's memory, so a Redis outage neither stops confirmations nor lifts the
limits.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import structlog
from flask import Flask, g, request
from flask_limiter import Limiter, RouteLimit
from limits import parse_many
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix

from pipeline.crypto import BadSignature, Expired
from pipeline.db import ExportRow, RequestRow
from pipeline.errors import ConfigurationError
from pipeline.notify import DOWNLOAD_PURPOSE
from pipeline.verification import request_of_link

if TYPE_CHECKING:
    from pipeline.bootstrap import App
    from pipeline.settings import Settings

log = structlog.get_logger()
View = TypeVar("View", bound=Callable[..., Any])
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+unix://")


def storage_url(settings: Settings) -> str:
    """Where the counters live: the configured URL, else the broker's Redis, else (a
    RabbitMQ broker and nothing configured) this process's memory."""
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_url.startswith(_REDIS_SCHEMES):
        return settings.broker_url
    return "memory://"


def key_prefix(settings: Settings) -> str:
    """Every counter key starts with this (under the broker's namespace)."""
    return f"{settings.queue_namespace}:ratelimit"


def checked_limit(env_name: str, value: str) -> str:
    """A limit string, refused at start-up with the variable's name if it does not parse."""
    try:
        items = parse_many(value)
    except ValueError as exc:
        raise ConfigurationError(
            f"{env_name} must be a rate limit such as '30/minute' or '10/minute;100/hour',"
            f" got {value!r}"
        ) from exc
    if not items:
        raise ConfigurationError(f"{env_name} must name at least one rate limit, got {value!r}")
    return value


def address_of(remote_addr: str | None) -> str:
    """The client address a budget is kept for: an IPv6 host holds a whole /64, so an
    IPv6 address counts by its /64; anything unparseable counts as itself."""
    raw = remote_addr or "unknown"
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


def subject_of_verification_link(app: App, token: str) -> str | None:
    """The keyed email hash of the request a verification link is bound to, if the link
    is authentic and unexpired."""
    request_id = request_of_link(app, token)
    if request_id is None:
        return None
    with app.sessions() as session:
        return session.execute(
            select(RequestRow.subject_hash).where(RequestRow.id == request_id)
        ).scalar()


def subject_of_download_link(app: App, token: str) -> str | None:
    """The keyed email hash of the request an export link belongs to, if the link is
    authentic and unexpired."""
    try:
        export_id = app.keys.signer(DOWNLOAD_PURPOSE).unsign(token)
    except (BadSignature, Expired):
        return None
    with app.sessions() as session:
        return session.execute(
            select(RequestRow.subject_hash)
            .join(ExportRow, ExportRow.request_id == RequestRow.id)
            .where(ExportRow.id == export_id)
        ).scalar()


class WebLimits:
    """The limits of one web app: `verify` and `download` decorate its views."""

    def __init__(self, app: App, web: Flask):
        s = app.settings
        self._app = app
        if s.trusted_proxies < 0:
            raise ConfigurationError("PRIVACY_TRUSTED_PROXIES must be 0 or more")
        if s.trusted_proxies:
            # Only behind proxies we run: each one appends the address it saw, and we
            # believe exactly that many entries from the right of X-Forwarded-For.
            web.wsgi_app = ProxyFix(  # type: ignore[method-assign]
                web.wsgi_app, x_for=s.trusted_proxies, x_proto=s.trusted_proxies
            )
        url = storage_url(s)
        options: dict[str, str | int] = {}
        if url.startswith(_REDIS_SCHEMES):
            options = {"key_prefix": key_prefix(s), "socket_timeout": 2}
            options["socket_connect_timeout"] = 2
        else:
            log.warning("rate_limits_in_memory", reason="no Redis: limits count per process")
        self.limiter = Limiter(
            key_func=self._address_key,
            app=web,
            storage_uri=url,
            storage_options=options,
            strategy="moving-window",
            swallow_errors=True,
            in_memory_fallback_enabled=True,
            headers_enabled=False,
        )
        self._verify = self._pair(
            "verify",
            checked_limit("PRIVACY_VERIFY_LIMIT_PER_ADDRESS", s.verify_limit_per_address),
            checked_limit("PRIVACY_VERIFY_LIMIT_PER_EMAIL", s.verify_limit_per_email),
            subject_of_verification_link,
        )
        self._download = self._pair(
            "download",
            checked_limit("PRIVACY_DOWNLOAD_LIMIT_PER_ADDRESS", s.download_limit_per_address),
            checked_limit("PRIVACY_DOWNLOAD_LIMIT_PER_EMAIL", s.download_limit_per_email),
            subject_of_download_link,
        )

    def verify(self, view: View) -> View:
        """The confirmation page and its button share one budget per address and person."""
        return self._apply(self._verify, view)

    def download(self, view: View) -> View:
        return self._apply(self._download, view)

    def retry_after(self) -> int:
        """Whole seconds until the breached budget has room again (for Retry-After)."""
        current = self.limiter.current_limit
        if current is None:
            return 60
        try:
            return max(1, math.ceil(current.reset_at - time.time()))
        except Exception:  # the counters' storage failed between the check and now
            return 60

    # -- internals -------------------------------------------------------------------

    def _pair(
        self,
        page: str,
        per_address: str,
        per_email: str,
        subject_of: Callable[[App, str], str | None],
    ) -> list[RouteLimit]:
        def person_key() -> str:
            return self._person_key(page, subject_of)

        return [
            self.limiter.shared_limit(per_address, scope=f"{page}-address"),
            self.limiter.shared_limit(
                per_email,
                scope=f"{page}-email",
                key_func=person_key,
                exempt_when=lambda: not person_key(),
            ),
        ]

    @staticmethod
    def _apply(limits: list[RouteLimit], view: View) -> View:
        wrapped: Callable[..., Any] = view
        for limit in limits:
            wrapped = limit(wrapped)
        return cast(View, wrapped)

    def _address_key(self) -> str:
        return self._app.blind.of("ratelimit-address", address_of(request.remote_addr))

    def _person_key(self, page: str, subject_of: Callable[[App, str], str | None]) -> str:
        """The person's budget key, looked up once per HTTP request; "" when the link
        names no request (so only the address budget applies)."""
        cache: dict[str, str] = g.setdefault("_privacy_person_keys", {})
        if page not in cache:
            token = (request.view_args or {}).get("token", "")
            try:
                subject = subject_of(self._app, str(token)) if token else None
            except SQLAlchemyError as exc:
                # The state database is down: the page will fail on its own; do not let
                # the limiter mistake this for its Redis being down.
                log.warning("rate_limit_lookup_failed", page=page, error=type(exc).__name__)
                subject = None
            cache[page] = self._app.blind.of("ratelimit-person", subject) if subject else ""
        return cache[page]
