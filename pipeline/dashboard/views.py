"""The dashboard's pages and actions. Every route names the least role it needs, and
the server enforces it: a hidden button is a courtesy, not the control.

Actions are POSTs carrying the session's CSRF token; each calls the same operation the
CLI does (`pipeline.operations`, `pipeline.notify.close_case`) with the operator's name
as the actor, so each is in the audit log, and then redirects back to the request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import operations
from pipeline.dashboard import auth, overview
from pipeline.dashboard.auth import Role, SignedIn
from pipeline.dashboard.deadletters import DeadLetterGone, DeadLettersUnavailable
from pipeline.dashboard.overview import BadFilter, Cursor, RequestFilter
from pipeline.errors import PermanentError, UnknownRequest
from pipeline.notify import close_case

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pipeline.bootstrap import App
    from pipeline.dashboard.deadletters import DeadLetters
    from pipeline.dashboard.queues import QueueReader

SESSION_COOKIE = "privacy_ops_session"
SIGNIN_COOKIE = "privacy_ops_signin"
EXTENSION = "allego_privacy"

bp = Blueprint("dashboard", __name__)
View = TypeVar("View", bound=Callable[..., Any])

DONE = {
    "retried": "Retry started: the failed stores are being tried again.",
    "extended": "Deadline extended; the person will be told.",
    "cancelled": "Request cancelled.",
    "resent": "The email will be sent again.",
    "closed": "Concern closed; the reply will be mailed.",
}


def _app() -> App:
    return cast("App", current_app.extensions[EXTENSION]["app"])


def _queues() -> QueueReader:
    return cast("QueueReader", current_app.extensions[EXTENSION]["queues"])


def _dead_letters() -> DeadLetters:
    return cast("DeadLetters", current_app.extensions[EXTENSION]["dead_letters"])


def _secure() -> bool:
    return bool(current_app.extensions[EXTENSION]["secure_cookies"])


def signed_in() -> SignedIn | None:
    return cast("SignedIn | None", g.get("signed_in"))


def _refuse(status: int, message: str) -> tuple[str, int]:
    return render_template("dashboard/refused.html", message=message), status


@bp.before_app_request
def _load_session() -> None:
    g.signed_in = auth.resume(_app(), request.cookies.get(SESSION_COOKIE, ""))


@bp.app_context_processor
def _context() -> dict[str, Any]:
    signed = signed_in()
    return {
        "me": signed.operator if signed else None,
        "csrf": signed.csrf if signed else "",
        "Role": Role,
    }


def requires(role: Role) -> Callable[[View], View]:
    """Sign-in, then (for a POST) the CSRF token, then the role: in that order, always."""

    def decorate(view: View) -> View:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            signed = signed_in()
            if signed is None:
                if request.method == "GET":
                    return redirect(url_for("dashboard.signin_page", next=request.full_path))
                return _refuse(401, "Your session has ended. Sign in again.")
            if request.method == "POST" and not auth.csrf_matches(
                signed.csrf, request.form.get("csrf")
            ):
                return _refuse(403, "This form is out of date. Go back, reload and try again.")
            if not signed.operator.role.includes(role):
                return _refuse(403, f"This needs the {role} role; you are {signed.operator.role}.")
            return view(*args, **kwargs)

        return cast(View, guarded)

    return decorate


def _actor() -> str:
    signed = signed_in()
    assert signed is not None
    return signed.operator.name


# -- signing in and out ------------------------------------------------------------------


def _signin_csrf(nonce: str) -> str:
    """Before there is a session, the sign-in form is bound to a cookie nonce."""
    key = _app().keys.signing_key
    return hmac.new(key, f"ops-signin|{nonce}".encode(), hashlib.sha256).hexdigest()


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("dashboard.home")


def _signin_form(error: str | None = None, status: int = 200) -> Response:
    nonce = secrets.token_urlsafe(16)
    page = render_template(
        "dashboard/signin.html",
        signin_csrf=_signin_csrf(nonce),
        next=_safe_next(request.values.get("next")),
        error=error,
    )
    response = Response(page, status=status)
    response.set_cookie(
        SIGNIN_COOKIE, nonce, httponly=True, samesite="Strict", secure=_secure(), max_age=3600
    )
    return response


@bp.get("/signin")
def signin_page() -> Response:
    return _signin_form()


@bp.post("/signin")
def signin() -> ResponseReturnValue:
    nonce = request.cookies.get(SIGNIN_COOKIE, "")
    if not nonce or not auth.csrf_matches(_signin_csrf(nonce), request.form.get("csrf")):
        return _signin_form("The form was out of date; please try again.", 403)
    started = auth.sign_in(
        _app(),
        request.form.get("name", "").strip(),
        request.form.get("password", ""),
        replaces=request.cookies.get(SESSION_COOKIE) or None,
    )
    if started is None:
        return _signin_form("That name and password do not match an active operator.", 401)
    token, _ = started
    response = redirect(_safe_next(request.form.get("next")))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        secure=_secure(),
        max_age=int(auth.SESSION_LIFETIME.total_seconds()),
    )
    response.delete_cookie(SIGNIN_COOKIE)
    return response


@bp.post("/signout")
@requires(Role.VIEWER)
def signout() -> ResponseReturnValue:
    auth.sign_out(_app(), request.cookies.get(SESSION_COOKIE, ""))
    response = redirect(url_for("dashboard.signin_page"))
    response.delete_cookie(SESSION_COOKIE)
    return response


# -- pages -------------------------------------------------------------------------------


@bp.get("/")
@requires(Role.VIEWER)
def home() -> str:
    return render_template(
        "dashboard/home.html",
        counts=overview.counts(_app()),
        broker=_queues().read(),
        health=overview.store_health(_app()),
        flow=overview.flow(_app()),
    )


@bp.get("/requests")
@requires(Role.VIEWER)
def request_list() -> str | tuple[str, int]:
    signed = signed_in()
    assert signed is not None
    try:
        flt = RequestFilter.from_args(request.args)
        raw_after = request.args.get("after")
        after = Cursor.decode(raw_after) if raw_after else None
    except BadFilter as exc:
        return _refuse(400, str(exc))
    page = overview.list_requests(_app(), flt, after=after, masked_pii=signed.operator.sees_pii)
    return render_template(
        "dashboard/requests.html",
        page=page,
        flt=flt,
        stores=overview.known_stores(_app()),
        states=[s.value for s in overview.State],
        types=[t.value for t in overview.RequestType],
        jurisdictions=[j.value for j in overview.Jurisdiction],
        next_args={**flt.as_args(), "after": page.next.encode()} if page.next else None,
    )


def _detail_page(
    request_id: str,
    *,
    revealed: dict[str, Any] | None = None,
    error: str | None = None,
    status: int = 200,
) -> tuple[str, int]:
    signed = signed_in()
    assert signed is not None
    try:
        info = overview.request_detail(_app(), request_id)
    except UnknownRequest:
        return _refuse(404, "There is no request with that id.")
    masked = overview.masked_subject(_app(), request_id) if signed.operator.sees_pii else None
    page = render_template(
        "dashboard/request.html",
        r=info,
        masked=masked,
        revealed=revealed,
        error=error,
        done=DONE.get(request.args.get("done", "")),
        suggested_due=overview.default_extension(datetime.fromisoformat(info["due_at"])),
    )
    return page, status


@bp.get("/requests/<request_id>")
@requires(Role.VIEWER)
def request_page(request_id: str) -> tuple[str, int]:
    return _detail_page(request_id)


@bp.post("/requests/<request_id>/reveal")
@requires(Role.OFFICER)
def reveal(request_id: str) -> tuple[str, int]:
    why = request.form.get("why", "").strip()
    if not why:
        return _detail_page(request_id, error="Say why you need to see this data.", status=400)
    revealed = overview.reveal(_app(), request_id, actor=_actor(), why=why)
    if revealed is None:
        return _detail_page(request_id, error="This request holds no personal data.", status=404)
    return _detail_page(request_id, revealed=revealed)


def _act(request_id: str, done: str, action: Callable[[], object]) -> ResponseReturnValue:
    try:
        action()
    except UnknownRequest as exc:
        return _detail_page(request_id, error=str(exc), status=404)
    except (PermanentError, BadFilter) as exc:
        return _detail_page(request_id, error=str(exc), status=409)
    return redirect(url_for("dashboard.request_page", request_id=request_id, done=done))


def _required(name: str, what: str) -> str:
    value = request.form.get(name, "").strip()
    if not value:
        raise BadFilter(f"{what} is required")
    return value


@bp.post("/requests/<request_id>/retry")
@requires(Role.OFFICER)
def retry(request_id: str) -> ResponseReturnValue:
    return _act(
        request_id, "retried", lambda: operations.retry_request(_app(), request_id, actor=_actor())
    )


@bp.post("/requests/<request_id>/extend")
@requires(Role.OFFICER)
def extend(request_id: str) -> ResponseReturnValue:
    def run() -> None:
        due = overview.parse_due(_required("due", "A new due date"))
        reason = _required("reason", "A reason")
        operations.extend_deadline(_app(), request_id, due, reason, actor=_actor())

    return _act(request_id, "extended", run)


@bp.post("/requests/<request_id>/cancel")
@requires(Role.OFFICER)
def cancel(request_id: str) -> ResponseReturnValue:
    def run() -> None:
        reason = _required("reason", "A reason")
        operations.cancel_request(_app(), request_id, reason, actor=_actor())

    return _act(request_id, "cancelled", run)


@bp.post("/requests/<request_id>/resend")
@requires(Role.OFFICER)
def resend(request_id: str) -> ResponseReturnValue:
    def run() -> None:
        event = _required("event", "The email")
        operations.resend_notification(_app(), request_id, event, actor=_actor())

    return _act(request_id, "resent", run)


@bp.post("/requests/<request_id>/close-concern")
@requires(Role.OFFICER)
def close_concern(request_id: str) -> ResponseReturnValue:
    def run() -> None:
        reply = _required("reply", "A reply")
        close_case(_app(), request_id, reply, actor=_actor())

    return _act(request_id, "closed", run)


# -- dead letters ------------------------------------------------------------------------

DEAD_DONE = {
    "replayed": "Replayed: the message is back on its queue with a new id.",
    "discarded": "Discarded.",
}


def _dead_letter_page(
    *, error: str | None = None, status: int = 200, done: str | None = None
) -> tuple[str, int]:
    signed = signed_in()
    assert signed is not None
    queue = request.args.get("queue") or None
    if queue is not None and queue not in overview.QUEUES:
        return _refuse(404, "There is no such queue.")
    unavailable = None
    try:
        found = _dead_letters().list(masked_pii=signed.operator.sees_pii, queue=queue)
    except DeadLettersUnavailable as exc:
        found, unavailable = [], str(exc)
    page = render_template(
        "dashboard/dead_letters.html",
        found=found,
        queue=queue,
        queues=overview.QUEUES,
        unavailable=unavailable,
        error=error,
        done=DEAD_DONE.get(done or request.args.get("done", "")),
    )
    return page, status


@bp.get("/dead-letters")
@requires(Role.VIEWER)
def dead_letters() -> tuple[str, int]:
    return _dead_letter_page()


def _on_dead_letter(done: str, action: Callable[[], object]) -> ResponseReturnValue:
    try:
        action()
    except DeadLetterGone as exc:
        return _dead_letter_page(error=str(exc), status=404)
    except DeadLettersUnavailable as exc:
        return _dead_letter_page(error=str(exc), status=503)
    except PermanentError as exc:
        return _dead_letter_page(error=str(exc), status=400)
    return redirect(url_for("dashboard.dead_letters", done=done))


@bp.post("/dead-letters/<queue>/<key>/replay")
@requires(Role.OFFICER)
def dead_letter_replay(queue: str, key: str) -> ResponseReturnValue:
    return _on_dead_letter(
        "replayed", lambda: _dead_letters().replay(queue, key, operator=_actor())
    )


@bp.post("/dead-letters/<queue>/<key>/discard")
@requires(Role.OFFICER)
def dead_letter_discard(queue: str, key: str) -> ResponseReturnValue:
    def run() -> None:
        reason = request.form.get("reason", "").strip()
        if not reason:
            raise PermanentError("Say why the message is discarded.")
        _dead_letters().discard(queue, key, operator=_actor(), reason=reason)

    return _on_dead_letter("discarded", run)


# -- operators (admin) -------------------------------------------------------------------


@bp.get("/operators")
@requires(Role.ADMIN)
def operator_list() -> str:
    return render_template(
        "dashboard/operators.html",
        operators=auth.list_operators(_app()),
        roles=list(Role),
        error=None,
    )


@bp.post("/operators")
@requires(Role.ADMIN)
def operator_create() -> ResponseReturnValue:
    try:
        auth.create_operator(
            _app(),
            request.form.get("name", "").strip(),
            request.form.get("role", ""),
            request.form.get("password", ""),
            actor=_actor(),
        )
    except auth.OperatorError as exc:
        page = render_template(
            "dashboard/operators.html",
            operators=auth.list_operators(_app()),
            roles=list(Role),
            error=str(exc),
        )
        return page, 400
    return redirect(url_for("dashboard.operator_list"))


@bp.post("/operators/<name>/disable")
@requires(Role.ADMIN)
def operator_disable(name: str) -> ResponseReturnValue:
    if name == _actor():
        return _refuse(409, "You cannot disable yourself; ask another admin.")
    try:
        auth.disable_operator(_app(), name, actor=_actor())
    except auth.OperatorError as exc:
        return _refuse(404, str(exc))
    return redirect(url_for("dashboard.operator_list"))


# -- machines ----------------------------------------------------------------------------


@bp.get("/metrics")
def metrics() -> Response:
    """Counts and depths only, no personal data: open to the monitoring network."""
    registry = cast("CollectorRegistry", current_app.extensions[EXTENSION]["registry"])
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
