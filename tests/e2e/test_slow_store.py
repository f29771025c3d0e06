"""End to end: one slow store does not stall the others (issue 3, "async end to end, or
clearly offloaded to threads").

Real dramatiq workers (one process, four threads) over the real Redis, a fresh SQLite
state database and a mail sink. The stores come from a stores TOML this test writes:
three fast in-memory stores and one HTTP store backed by the fake product API, served
from this process. The API is switched to stall (it holds every request unanswered)
before a pre-verified access request is submitted. While it stalls, every other
store's locate task must already be done: the slow store holds one worker thread and
the others go on. Then the API answers again and the request completes.

No timed assertions: every wait is bounded polling.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline import contract
from pipeline.bootstrap import App
from pipeline.intake import submit
from pipeline.mailsink import MailSink, free_port
from pipeline.migrate import upgrade
from pipeline.settings import Settings
from pipeline.stack import LocalStack
from pipeline.status import describe_request
from tests.integration.connectors.fake_product_api import TOKEN, FakeProductApi, _handler

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).resolve().parent
CRM_MAPPING = HERE.parent / "integration" / "connectors" / "crm_http.toml"
FAST_STORES = ("alpha", "beta", "gamma")
SLOW_STORE = "crm"
EMAIL = "robin.slowpoke@example.com"
NAME = "Robin Slowpoke"
# The API holds a request at most this long (the test releases it much sooner);
# the HTTP connector waits longer than that, so the stall is one long call, not a retry.
STALL_LIMIT = 60
CONNECTOR_TIMEOUT = 120
TOKEN_ENV = "SLOW_STORE_TEST_TOKEN"


@dataclass
class StallableApi:
    """The fake product API, with a gate: while it is closed, requests are held unanswered."""

    api: FakeProductApi
    gate: threading.Event
    url: str = ""
    held: int = 0  # requests that arrived while the gate was closed
    answered: int = 0  # requests let through the gate
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stall(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def arrived(self) -> None:
        with self.lock:
            if not self.gate.is_set():
                self.held += 1

    def let_through(self) -> None:
        with self.lock:
            self.answered += 1

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.held, self.answered


@contextmanager
def serve_stallable(api: FakeProductApi) -> Iterator[StallableApi]:
    handle = StallableApi(api, threading.Event())
    handle.gate.set()
    base = _handler(api)

    class GatedHandler(base):  # type: ignore[misc, valid-type]
        def _serve(self) -> None:
            handle.arrived()
            # bounded, so a failing test cannot hang the server; the test checks that
            # nothing got through while it expected the stall
            handle.gate.wait(STALL_LIMIT)
            handle.let_through()
            super()._serve()

        do_GET = do_PATCH = do_DELETE = do_PUT = do_POST = _serve  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    handle.url = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        yield handle
    finally:
        handle.gate.set()
        server.shutdown()
        server.server_close()
        thread.join()


def stores_toml(crm_url: str) -> str:
    blocks = []
    for index, store in enumerate(FAST_STORES):
        pid = f"{store[0]}-{index + 1}"
        blocks.append(
            f'[stores.{store}]\nconnector = "memory"\ntitle = "Fast store {store}"\n'
            f'people = [{{ id = "{pid}", email = "{EMAIL}", name = "{NAME}" }},'
            f' {{ id = "{pid}0", email = "someone.else@example.com", name = "Someone Else" }}]\n'
            f'records = {{ notes = [{{ id = "{store}-n1", owner = "{pid}", text = "hello" }},'
            f' {{ id = "{store}-n2", owner = "{pid}0", text = "not theirs" }}] }}\n'
        )
    blocks.append(
        f'[stores.{SLOW_STORE}]\nconnector = "http"\nbase_url = "{crm_url}"\n'
        f'token_env = "{TOKEN_ENV}"\nmapping = "{CRM_MAPPING}"\n'
        f"timeout = {CONNECTOR_TIMEOUT}\nmax_attempts = 3\nbackoff_base = 0.2\n"
        "rate_limit = 0\n"
    )
    return "\n".join(blocks)


def wait_for(what: str, check: Callable[[], Any], stack: LocalStack, timeout: float = 90) -> Any:
    """Bounded polling: the value of `check` once truthy, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        stack.check_alive()
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tasks(app: App, rid: str, phase: str) -> dict[str, str]:
    try:
        info = describe_request(app, rid)
    except Exception:
        return {}
    return {t["store"]: t["status"] for t in info["stores"] if t["phase"] == phase}


def test_a_stalled_store_holds_one_thread_while_the_others_finish(tmp_path: Path) -> None:
    api = FakeProductApi(
        users={
            "c-1": {
                "id": "c-1",
                "email": EMAIL,
                "name": NAME,
                "title": "Coach",
                "phone": "+44 20 7946 0000",
                "newsletter": True,
                "password_hash": "scrypt$slow-store-hash",
            }
        },
        notes={"n-1": {"id": "n-1", "user_id": "c-1", "text": "Call back on Monday"}},
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with serve_stallable(api) as crm, MailSink(tmp_path / "mail", port=0) as sink:
        stores = tmp_path / "stores.toml"
        stores.write_text(stores_toml(crm.url), encoding="utf-8")
        web_port = free_port()
        env = {
            "PRIVACY_DATA_DIR": str(data_dir),
            "PRIVACY_STORES_CONFIG": str(stores),
            "PRIVACY_DATABASE_URL": f"sqlite:///{tmp_path / 'state.db'}",
            "PRIVACY_QUEUE_NAMESPACE": f"privacy-slow-{uuid.uuid4().hex[:8]}",
            "PRIVACY_SMTP_PORT": str(sink.port),
            "PRIVACY_WEB_PORT": str(web_port),
            "PRIVACY_BASE_URL": f"http://127.0.0.1:{web_port}",
            "PRIVACY_RETRY_BASE_MS": "200",
            "PRIVACY_STALL_SECONDS": "600",  # the reconciler must not re-send the held task
            TOKEN_ENV: TOKEN,
        }
        app = App(Settings.from_env(env))
        upgrade(app.engine)
        keys = app.keys  # written once, before the workers start
        local = LocalStack(env=env, log_dir=tmp_path / "logs", processes=1, threads=4, web=False)
        try:
            with local:
                crm.stall()
                rid = f"slow-{uuid.uuid4().hex[:8]}"
                now = datetime.now(UTC)
                doc = {
                    "schema": contract.SCHEMA_ID,
                    "request_id": rid,
                    "type": "access",
                    "subject": {"email": EMAIL, "name": NAME},
                    "jurisdiction": "gdpr",
                    "received_at": now.isoformat(),
                    "channel": "web",
                    "verification": contract.sign_assertion(
                        keys.intake_keys["allego-app"],
                        request_id=rid,
                        kind="access",
                        email=EMAIL,
                        system="allego-app",
                        expires_at=now + timedelta(hours=1),
                    ),
                }
                submit(doc, bus=app.bus)
                started = time.monotonic()

                # The slow store's locate has reached the API and is held there, and
                # meanwhile every other store's locate has finished.
                wait_for("the API to hold the slow store's locate", lambda: crm.counts()[0], local)
                wait_for(
                    "every fast store's locate to be done",
                    lambda: all(tasks(app, rid, "locate").get(s) == "done" for s in FAST_STORES),
                    local,
                )
                others_done = time.monotonic() - started
                held_requests, answered = crm.counts()
                assert answered == 0, "the API answered: it was meant to be stalled throughout"
                held = tasks(app, rid, "locate")
                assert held.get(SLOW_STORE) != "done", held
                assert describe_request(app, rid)["state"] != "done"
                assert not api.requests  # asked (held_requests >= 1), never answered

                crm.release()
                released = time.monotonic() - started
                info = wait_for(
                    "the request to be done",
                    lambda: (i := describe_request(app, rid))["state"] == "done" and i,
                    local,
                )
                locate = {t["store"]: t["status"] for t in info["stores"] if t["phase"] == "locate"}
                assert locate == {s: "done" for s in (*FAST_STORES, SLOW_STORE)}, locate
                assert all(t["status"] == "done" for t in info["stores"]), info["stores"]
                print(  # for the record only; nothing is asserted on time
                    f"fast stores located after {others_done:.1f} s with {held_requests} "
                    f"request(s) of {SLOW_STORE} held (task {held.get(SLOW_STORE)}); "
                    f"released at {released:.1f} s; done at {time.monotonic() - started:.1f} s"
                )
        finally:
            crm.release()
            app.broker.close()
            app.close()
