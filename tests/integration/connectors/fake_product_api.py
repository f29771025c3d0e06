"""A small product REST service for the HTTP connector's tests: a real HTTP server in a
thread, an in-memory dataset, bearer-token auth, cursor pagination, and switches to
answer 429/503 for the next calls or to stall."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "test-token-5f2c"


@dataclass
class FakeProductApi:
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)
    page_size: int = 100
    next_style: str = "cursor"  # or "path": `next` is the next page's path
    failures: list[tuple[int, str | None]] = field(default_factory=list)
    stall_seconds: float = 0.0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, n: int, status: int = 503, retry_after: str | None = None) -> None:
        with self.lock:
            self.failures.extend([(status, retry_after)] * n)

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    # ------------------------------------------------------------------ routes

    def page(self, items: list[dict[str, Any]], path: str, query: dict[str, str]) -> Any:
        start = int(query.get("cursor", "0"))
        chunk = items[start : start + self.page_size]
        more = start + self.page_size < len(items)
        following: str | None = None
        if more:
            cursor = str(start + self.page_size)
            if self.next_style == "path":
                rest = {k: v for k, v in query.items() if k != "cursor"}
                rest["cursor"] = cursor
                following = f"/api{path}?{urllib.parse.urlencode(rest)}"
            else:
                following = cursor
        return {"items": chunk, "next": following}

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts == ["health"]:
            return 200, {"ok": True}
        if parts == ["users"] and method == "GET":
            wanted = query.get("email", "").lower()
            # a loose search, as many services do: a substring match
            found = [u for u in self.users.values() if wanted in u["email"].lower()]
            return 200, self.page(found, path, query)
        if len(parts) == 2 and parts[0] == "users":
            user = self.users.get(parts[1])
            if method == "GET":
                return (200, user) if user else (404, {"error": "not found"})
            if method == "PATCH":
                if user is None:
                    return 404, {"error": "not found"}
                user.update(body or {})
                return 200, user
            if method == "DELETE":
                if self.users.pop(parts[1], None) is None:
                    return 404, {"error": "not found"}
                return 204, None
        if len(parts) == 3 and parts[0] == "users" and method == "GET":
            table = {"notes": self.notes, "receipts": self.receipts}.get(parts[2])
            if table is None:
                return 404, {"error": "not found"}
            items = [r for r in table.values() if r["user_id"] == parts[1]]
            return 200, self.page(sorted(items, key=lambda r: r["id"]), path, query)
        if len(parts) == 2 and parts[0] == "notes" and method == "DELETE":
            if self.notes.pop(parts[1], None) is None:
                return 404, {"error": "not found"}
            return 204, None
        return 400, {"error": f"no route {method} {path}"}


def _handler(api: FakeProductApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Quiet: the test output is for the tests."""

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = url.path.removeprefix("/api")
            query = dict(urllib.parse.parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with api.lock:
                api.requests.append((self.command, path))
                failure = api.failures.pop(0) if api.failures else None
            if api.stall_seconds:
                time.sleep(api.stall_seconds)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, payload, headers = 401, {"error": "bad token"}, {}
            elif failure is not None:
                status, retry_after = failure
                payload = {"error": "try later"}
                headers = {"Retry-After": retry_after} if retry_after else {}
            else:
                with api.lock:
                    status, payload = api.route(
                        self.command, path, query, json.loads(raw) if raw else None
                    )
                headers = {}
            data = b"" if payload is None else json.dumps(payload).encode()
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (the stall switch)

        do_GET = do_PATCH = do_DELETE = do_PUT = do_POST = _serve  # noqa: N815

    return Handler


@contextmanager
def serve(api: FakeProductApi) -> Iterator[str]:
    """Run the service on a free local port; yields its base URL (ending in /api)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
