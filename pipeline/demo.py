"""`privacy demo`: the whole pipeline on one machine, acting as the person.

It seeds the Allego demo stores, starts Redis if none answers, a mail sink, the worker,
web, scheduler and operations dashboard processes, submits one request of each type,
confirms the emailed links over HTTP like a person would, downloads the export, signs in
to the dashboard as a demo admin (a fresh random password, printed once) to check it
lists the requests, and prints where everything is and how to open the dashboard again
on the same data. Every part is the real one: dramatiq over Redis, SQLite state, SMTP,
HTTP.
"""

from __future__ import annotations

import http.cookiejar
import re
import secrets
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from pipeline import contract
from pipeline.bootstrap import App
from pipeline.intake import submit
from pipeline.mailsink import MailSink, read_messages
from pipeline.migrate import upgrade
from pipeline.services import ensure_redis
from pipeline.settings import Settings
from pipeline.stack import LocalStack
from pipeline.states import TERMINAL, State
from pipeline.status import describe_request

FINAL = {s.value for s in TERMINAL} | {State.NEEDS_ATTENTION.value}


def mails_for(folder: Path, request_id: str) -> list[EmailMessage]:
    """Messages about one request (they carry its reference in the body)."""
    found = []
    for message in read_messages(folder):
        body = message.get_body(("plain",))
        if body is not None and request_id in body.get_content():
            found.append(message)
    return found


def link_in(message: EmailMessage, kind: str) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    match = re.search(rf"(https?://\S+/{kind}/\S+)", body.get_content())
    if match is None:
        raise LookupError(f"no /{kind}/ link in the message")
    return match.group(1)


def confirm_link(url: str) -> int:
    """Open the confirmation page, then press its button (a POST with the CSRF token)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(url, timeout=10) as page:
        html = page.read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)
    if csrf is None:
        raise LookupError("the confirmation page has no form")
    data = urllib.parse.urlencode({"csrf": csrf.group(1)}).encode()
    with opener.open(urllib.request.Request(url, data=data, method="POST"), timeout=10) as resp:
        return int(resp.status)


DEMO_ADMIN = "demo-admin"


def demo_admin(app: App) -> tuple[str, str]:
    """The demo's admin operator, with a new random password each run (a re-run on the
    same data dir resets it; its old sessions end)."""
    from pipeline.dashboard.auth import OperatorError, create_operator, set_password

    password = secrets.token_urlsafe(12)
    try:
        create_operator(app, DEMO_ADMIN, "admin", password, actor="demo")
    except OperatorError:
        set_password(app, DEMO_ADMIN, password, actor="demo")
    return DEMO_ADMIN, password


def dashboard_shows(base: str, name: str, password: str, request_ids: list[str]) -> list[str]:
    """Sign in to the dashboard over HTTP as an operator would, and open each request's
    page; the ids whose page it shows."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{base}/signin", timeout=10) as page:
        html = page.read().decode()
    csrf = re.search(
        r'action="/signin"[^>]*>\s*<input type="hidden" name="csrf" value="([^"]+)"', html
    )
    if csrf is None:
        raise LookupError("the dashboard's sign-in page has no form")
    data = urllib.parse.urlencode({"csrf": csrf.group(1), "name": name, "password": password})
    request = urllib.request.Request(f"{base}/signin", data=data.encode(), method="POST")
    try:
        with opener.open(request, timeout=30) as resp:
            signed_in = "Sign out" in resp.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            raise
        signed_in = False
    if not signed_in:
        raise LookupError(f"the dashboard did not sign {name} in")
    shown = []
    for rid in request_ids:
        try:
            with opener.open(f"{base}/requests/{urllib.parse.quote(rid)}", timeout=10) as resp:
                if rid in resp.read().decode():
                    shown.append(rid)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    return shown


def download(url: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=30) as resp, dest.open("wb") as out:
        shutil.copyfileobj(resp, out)
    return dest


def wait_until(
    app: App, request_ids: list[str], mail_dir: Path, timeout: float, stack: LocalStack
) -> dict[str, dict[str, Any]]:
    """Wait for the requests to finish, confirming verification links as they arrive."""
    confirmed: set[str] = set()
    deadline = time.monotonic() + timeout
    status: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        stack.check_alive()
        for rid in request_ids:
            try:
                status[rid] = describe_request(app, rid)
            except Exception:
                continue  # not taken in by intake yet
            if status[rid]["state"] == State.AWAITING_VERIFICATION.value and rid not in confirmed:
                for message in mails_for(mail_dir, rid):
                    if "confirm" in str(message["Subject"]).lower():
                        confirm_link(link_in(message, "verify"))
                        confirmed.add(rid)
        if len(status) == len(request_ids) and all(s["state"] in FINAL for s in status.values()):
            return status
        time.sleep(0.3)
    return status


def document(kind: str, request_id: str, email: str, name: str, **extra: Any) -> dict[str, Any]:
    doc = {
        "schema": contract.SCHEMA_ID,
        "request_id": request_id,
        "type": kind,
        "subject": {"email": email, "name": name},
        "jurisdiction": "gdpr",
        "received_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "channel": "web",
    }
    doc.update(extra)
    return doc


def run_demo(*, timeout: int = 180) -> int:
    from connectors.allego.seed import seed_demo_stores

    settings = Settings.from_env()
    data = settings.data_dir
    started = time.monotonic()
    print(f"== Allego privacy pipeline demo (data in {data.resolve()})")
    manifest = seed_demo_stores(data)
    print(f"-- seeded {len(manifest.stores)} product stores in {manifest.stores_dir}")
    app = App(settings)
    upgrade(app.engine)
    redis = ensure_redis(settings.broker_url, data_dir=data)
    print(
        f"-- redis: {'started one for the demo' if redis else 'using the one that answers'} "
        f"at {settings.broker_url}"
    )
    env = {"PRIVACY_DATA_DIR": str(data.resolve()), "PRIVACY_STALL_SECONDS": "30"}
    sink = MailSink(settings.mail_dir, host=settings.smtp_host, port=settings.smtp_port).start()
    stack = LocalStack(env=env, log_dir=data / "logs", processes=1, threads=4, dashboard=True)
    operator = demo_admin(app)
    try:
        stack.start()
        print(
            f"-- workers, web ({settings.base_url}), scheduler and dashboard "
            f"({stack.dashboard_url}) running; logs in {data / 'logs'}"
        )
        dana, sam, nobody = (manifest.person(k) for k in ("dana", "sam", "nobody"))
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        first = {
            f"demo-{stamp}-access": document(
                "access", f"demo-{stamp}-access", dana.email, dana.name
            ),
            f"demo-{stamp}-correct": document(
                "correct",
                f"demo-{stamp}-correct",
                sam.email,
                sam.name,
                corrections=[{"field": "job_title", "value": "Head of Sales Enablement"}],
            ),
            f"demo-{stamp}-opt_out": document(
                "opt_out", f"demo-{stamp}-opt_out", sam.email, sam.name
            ),
            f"demo-{stamp}-concern": document(
                "concern",
                f"demo-{stamp}-concern",
                nobody.email,
                nobody.name,
                concern={"message": "Why did I get a marketing email from you?"},
            ),
        }
        for doc in first.values():
            submit(doc, bus=app.bus)
        print(f"-- submitted {', '.join(first)}; confirming emailed links as the person")
        results = wait_until(app, list(first), settings.mail_dir, timeout, stack)
        erase_id = f"demo-{stamp}-erase"  # after the access request, so the export shows data
        submit(document("erase", erase_id, dana.email, dana.name), bus=app.bus)
        results.update(wait_until(app, [erase_id], settings.mail_dir, timeout, stack))
        ok = _report(app, settings, results, f"demo-{stamp}-access")
        ok = (
            _dashboard_report(stack, settings, operator, list(results), own_redis=bool(redis))
            and ok
        )
        print(
            f"\n== {'All requests done' if ok else 'Something did not finish (see !! above)'} "
            f"in {time.monotonic() - started:.1f}s"
        )
        return 0 if ok else 1
    finally:
        stack.stop()
        sink.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        app.close()


def _seconds_between(start: str, end: str) -> float:
    parse = datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _dashboard_report(
    stack: LocalStack,
    settings: Settings,
    operator: tuple[str, str],
    request_ids: list[str],
    *,
    own_redis: bool,
) -> bool:
    name, password = operator
    print(f"\n== Operations dashboard: {stack.dashboard_url}")
    try:
        shown = dashboard_shows(stack.dashboard_url, name, password, request_ids)
    except (OSError, LookupError) as exc:
        shown = []
        print(f"!! the dashboard could not be read: {exc}")
    print(f"   signed in as {name}: it shows {len(shown)} of the {len(request_ids)} requests")
    print(f"   sign in as: {name}   password: {password}   (printed once; reset each demo run)")
    print("   the demo stops its processes now; to open the dashboard on the same data, run")
    port = stack.env.get("PRIVACY_DASHBOARD_PORT")
    prefix = f"PRIVACY_DASHBOARD_PORT={port} " if port else ""
    print(f"     {prefix}PRIVACY_DATA_DIR={settings.data_dir} .venv/bin/privacy dashboard")
    print(f"   and open {stack.dashboard_url}")
    if own_redis:
        print("   (queue depths need Redis: the demo's own Redis stops with it; start one first)")
    if len(shown) != len(request_ids):
        print("!! the dashboard does not show every request")
        return False
    return True


def _report(
    app: App, settings: Settings, results: dict[str, dict[str, Any]], access_id: str
) -> bool:
    print("\n== Requests")
    ok = True
    for rid, info in results.items():
        took = ""
        if info.get("completed_at"):
            took = f"{_seconds_between(info['received_at'], info['completed_at']):.1f}s"
        print(f"   {rid:<36} {info['type']:<8} {info['state']:<16} {took}")
        if info["state"] != State.DONE.value:
            ok = False
            print(f"      reason: {info.get('reason')}")
    outcome = [
        m
        for m in mails_for(settings.mail_dir, access_id)
        if "download" in str(m["Subject"]).lower()
    ]
    if outcome:
        archive = download(
            link_in(outcome[0], "download"), settings.data_dir / "downloads" / f"{access_id}.zip"
        )
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
        print(f"\n== Export downloaded over its signed link: {archive.resolve()}")
        print(f"   {len(names)} files, e.g. {', '.join(names[:6])}")
    else:
        ok = False
        print("\n!! no download email for the access request")
    print(f"\n== Mail sent (one .eml file per message): {settings.mail_dir.resolve()}")
    print(f"   {len(read_messages(settings.mail_dir))} messages")
    print(f"   encrypted archives at rest: {settings.exports_dir.resolve()}")
    print(f"   state database: {settings.state_url}")
    print(f"   status of a request: privacy status {access_id}")
    return ok
