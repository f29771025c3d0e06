"""The operations dashboard on a state database of 100,000 requests: how long each page
takes to render, on SQLite and PostgreSQL.

    .venv/bin/python bench/dashboard_scale.py [--requests 100000] \
        [--database both|sqlite|postgresql] [--repeat 10] [--days 90] \
        [--last-day-share 0.1] [--deep 50] [--seed 1] [--no-plans] [--vacuum]

1. Per backend, a fresh state database (`bench.throughput.state_database`: a SQLite
   file in a temporary folder, or a throwaway PostgreSQL database), migrated with the
   project's Alembic migrations, and filled in bulk: one transaction per `--chunk`
   requests, each table's rows handed to the driver at once (SQLite's executemany,
   PostgreSQL's COPY), with the values SQLAlchemy's column types would bind; no ORM,
   no statement per row. Each request lives a simulated
   life up to now: received over the last `--days` days (`--last-day-share` of them in
   the last 24 hours), verified by a signed assertion or an email link (some never
   confirm and expire), one locate task per store (six), an act task per store that
   holds the person, a re-check per erased store, then notifying and done. Store calls
   take a store-typical time (`duration_ms`), a few need a retry (`attempts`,
   `last_error`), and about 1 % of requests stop in `needs_attention` with the
   pipeline's reason; a quarter of those were cancelled by an officer. Whatever would
   happen after now has not happened: recent requests are still in flight, with
   pending tasks. Every state change has its transition row and audit entry; audit
   entries are hash-chained in insertion order (`privacy audit verify` would pass;
   it is not timed). Two notifications per request, an export per finished access
   request, a case per concern. `subject_enc` is a real ciphertext of the app's key
   ring and `subject_hash` its keyed hash, so the officer's masked list decrypts.
   PostgreSQL gets `ANALYZE` (as autovacuum soon would; `--vacuum` for `VACUUM
   ANALYZE`, which also lets index-only scans skip the table); SQLite gets nothing, as
   the application never runs `ANALYZE`.
2. Signs in a viewer and an officer through the dashboard's sign-in form (the Flask test
   client of `create_dashboard`) and times each page `--repeat` times after one
   untimed warm-up: the wall time of the request, and the time spent in SQL
   (`before_cursor_execute` / `after_cursor_execute`).
3. Prints the plans of the SELECTs the overview, the request lists and `/metrics`
   send (PostgreSQL `EXPLAIN ANALYZE`, SQLite `EXPLAIN QUERY PLAN`), unless
   `--no-plans`.

Writes bench/results/dashboard-scale-<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `pipeline` importable
    sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402
import structlog  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402

from bench.connector_scale import explain  # noqa: E402
from bench.throughput import state_database  # noqa: E402
from pipeline import contract, policy  # noqa: E402
from pipeline.audit import GENESIS, _entry_hash  # noqa: E402
from pipeline.bootstrap import App  # noqa: E402
from pipeline.dashboard.app import create_dashboard  # noqa: E402
from pipeline.dashboard.auth import ScryptCost, create_operator  # noqa: E402
from pipeline.db import (  # noqa: E402
    AuditRow,
    Base,
    CaseRow,
    ExportRow,
    NotificationRow,
    RequestRow,
    StoreTaskRow,
    TransitionRow,
    UTCDateTime,
)
from pipeline.migrate import upgrade  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.states import (  # noqa: E402
    TERMINAL,
    Jurisdiction,
    RequestType,
    State,
    needs_verification,
)

RESULTS = REPO / "bench" / "results"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

TYPE_MIX = (("access", 30), ("correct", 20), ("erase", 20), ("opt_out", 20), ("concern", 10))
JURISDICTION_MIX = (("gdpr", 50), ("ccpa", 35), ("other", 15))
CHANNEL_MIX = (("web", 55), ("app", 25), ("support", 15), ("email", 5))
# The six Allego stores and the median time of one call to each, in ms.
STORE_MEDIAN_MS = {
    "billing": 80,
    "coaching": 40,
    "learning": 60,
    "marketing": 250,
    "media": 120,
    "video": 50,
}
STORES = sorted(STORE_MEDIAN_MS)
HOLDS_PERSON = 0.65  # chance that a store holds the person: an act task there
EMAIL_LINK = 0.4  # of the requests that need verification, the share without an assertion
NEVER_CONFIRMED = 0.15  # of those, the share that never opens the link (expires)
STOPS = 0.014  # chance a request stops in needs_attention (a store fails for good)
CANCELLED_LATER = 0.25  # of those, the share an officer cancels a day or two later
RETRIED = 0.03  # chance a store task needs a second attempt
MAX_ATTEMPTS = 6
QUEUE_S = 20.0  # mean wait of a message in its queue, seconds
BACKLOG = timedelta(minutes=30)  # the workers are behind: messages of the last half hour
BACKLOG_FACTOR = 15  # wait this many times longer (some requests are in flight)
ERRORS = (
    "TimeoutError: the store did not answer within 10 s",
    "StoreUnavailable: connection refused",
    "StoreUnavailable: HTTP 503 from the product API",
)
FIRST = ("Dana", "Sam", "Alex", "Maria", "Jon", "Priya", "Wei", "Fatima", "Lars", "Ana")
LAST = ("Reyes", "Okafor", "Nguyen", "Schmidt", "Rossi", "Kowalski", "Tanaka", "Silva")
SCRYPT_FAST = ScryptCost(n=2**10, r=8, p=1)  # benchmark operators only
PASSWORD = "bench-password-1"
OPERATORS = {"bench-viewer": "viewer", "bench-officer": "officer"}
FILL_ORDER = (
    RequestRow,
    TransitionRow,
    StoreTaskRow,
    NotificationRow,
    ExportRow,
    CaseRow,
    AuditRow,
)


def table_of(model: type[Base]) -> sa.Table:
    return cast(sa.Table, model.__table__)


def driver_value(column: sa.Column[Any]) -> Callable[[Any], Any]:
    """What the column's SQLAlchemy type would hand the driver: naive UTC for
    `UTCDateTime`, JSON text for `JSON`."""
    if isinstance(column.type, UTCDateTime):
        return lambda v: None if v is None else v.astimezone(UTC).replace(tzinfo=None)
    if isinstance(column.type, sa.JSON):
        return lambda v: None if v is None else json.dumps(v)
    return lambda v: v


def bulk_insert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """One chunk of one table, past SQLAlchemy's per-value processing (most of the time
    of a Core executemany here): SQLite's executemany, PostgreSQL's COPY (psycopg 3's
    executemany sends one statement per row)."""
    columns = list(table.columns)
    convert = [(c.name, driver_value(c)) for c in columns]
    values = [tuple(fn(row.get(name)) for name, fn in convert) for row in rows]
    names = ", ".join(c.name for c in columns)
    cursor = conn.connection.cursor()
    try:
        if conn.dialect.name == "postgresql":
            with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
                for value in values:
                    copy.write_row(value)
        else:
            marks = ", ".join("?" for _ in columns)
            cursor.executemany(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", values)
    finally:
        cursor.close()


def pick(rng: random.Random, mix: Sequence[tuple[str, int]]) -> str:
    return rng.choices([name for name, _ in mix], weights=[w for _, w in mix])[0]


def arrival_times(
    rng: random.Random, n: int, now: datetime, days: float, last_day_share: float
) -> list[datetime]:
    """Oldest first: `last_day_share` of the requests in the last 24 hours, the rest
    spread evenly over the `days` before."""
    day = 86_400.0
    ages = [
        rng.uniform(0, day) if rng.random() < last_day_share else rng.uniform(day, days * day)
        for _ in range(n)
    ]
    ages.sort(reverse=True)
    return [now - timedelta(seconds=age) for age in ages]


# -- filling -----------------------------------------------------------------------------


class Filler:
    """Builds each request's rows (a simulated life up to `now`) into per-table buffers
    and writes each table's buffer at once per chunk (`bulk_insert`)."""

    def __init__(self, app: App, now: datetime, rng: random.Random):
        self.app = app
        self.ring = app.keys.ring
        self.blind = app.blind
        self.now = now
        self.rng = rng
        self.rows: dict[type[Base], list[dict[str, Any]]] = {model: [] for model in FILL_ORDER}
        self.next_id: dict[type[Base], int] = {TransitionRow: 1, StoreTaskRow: 1, AuditRow: 1}
        self.prev_hash = GENESIS
        self.inserted: Counter[str] = Counter()
        self.states: Counter[str] = Counter()

    def flush(self) -> None:
        with self.app.engine.begin() as conn:
            for model in FILL_ORDER:
                rows = self.rows[model]
                if rows:
                    bulk_insert(conn, table_of(model), rows)
                    self.inserted[table_of(model).name] += len(rows)
                    rows.clear()

    def finish(self) -> None:
        """PostgreSQL: move the id sequences past the ids written here, so the app's own
        inserts (operators' audit entries) follow on."""
        self.flush()
        if self.app.engine.dialect.name != "postgresql":
            return
        with self.app.engine.begin() as conn:
            for model in self.next_id:
                table = table_of(model).name
                conn.execute(
                    sa.text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )

    def new_id(self, model: type[Base]) -> int:
        value = self.next_id[model]
        self.next_id[model] = value + 1
        return value

    def add_request(self, index: int, received: datetime) -> None:
        Life(self, index, received).live()

    def chain(self, events: list[tuple[datetime, str, str, str, dict[str, Any]]]) -> None:
        """Audit entries of one request, in time order, chained onto the head."""
        for at, actor, action, request_id, detail in sorted(events, key=lambda e: e[0]):
            digest = _entry_hash(self.prev_hash, at, actor, action, request_id, detail)
            self.rows[AuditRow].append(
                {
                    "id": self.new_id(AuditRow),
                    "at": at,
                    "actor": actor,
                    "action": action,
                    "request_id": request_id,
                    "detail": detail,
                    "prev_hash": self.prev_hash,
                    "hash": digest,
                }
            )
            self.prev_hash = digest


class Life:
    """One request from receipt to now. `move` stops the story at the first step that
    would happen after now: the request stays in the state it had reached."""

    def __init__(self, filler: Filler, index: int, received: datetime):
        self.filler = filler
        rng = filler.rng
        self.rng = rng
        self.kind = pick(rng, TYPE_MIX)
        self.jurisdiction = pick(rng, JURISDICTION_MIX)
        self.channel = pick(rng, CHANNEL_MIX)
        self.id = f"{self.channel}-{received.year}-{index:06d}"
        self.received = received
        self.due = policy.due_date(Jurisdiction(self.jurisdiction), received)
        self.state: str | None = None
        self.t = received
        self.alive = True  # False once the next step lies in the future
        self.completed_at: datetime | None = None
        self.updated_at = received
        self.verified_at: datetime | None = None
        self.detail: bytes | None = None
        self.reason: str | None = None
        self.outcome: dict[str, Any] | None = None
        self.audit: list[tuple[datetime, str, str, str, dict[str, Any]]] = []
        first, last = FIRST[index % len(FIRST)], LAST[(index // len(FIRST)) % len(LAST)]
        self.subject: dict[str, Any] = {
            "email": f"{first}.{last}{index}@example.com".lower(),
            "name": f"{first} {last}",
            "phone": f"+1 555 {index % 10_000:04d}",
        }
        if rng.random() < 0.3:
            self.subject["product_ids"] = {"video": f"v-{index}"}

    def wait(self, at: datetime, mean_s: float = QUEUE_S) -> timedelta:
        """A message's time in its queue: longer in the backlog of the last half hour."""
        if at > self.filler.now - BACKLOG:
            mean_s *= BACKLOG_FACTOR
        return timedelta(seconds=0.05 + self.rng.expovariate(1 / mean_s))

    def later(self, mean_s: float = QUEUE_S) -> datetime:
        return self.t + self.wait(self.t, mean_s)

    def record(self, at: datetime, action: str, actor: str = "system", **detail: Any) -> None:
        self.audit.append((at, actor, action, self.id, detail))

    def move(self, to: State, at: datetime, reason: str | None, actor: str = "system") -> bool:
        if not self.alive or at > self.filler.now:
            self.alive = False
            return False
        self.filler.rows[TransitionRow].append(
            {
                "id": self.filler.new_id(TransitionRow),
                "request_id": self.id,
                "from_state": self.state,
                "to_state": to.value,
                "reason": reason,
                "at": at,
            }
        )
        if self.state is not None:
            self.record(
                at,
                "request_state_changed",
                actor,
                from_state=self.state,
                to_state=to.value,
                reason=reason,
            )
        self.state, self.t, self.reason, self.updated_at = to.value, at, reason, at
        if to is State.VERIFIED:
            self.verified_at = at
        if to in TERMINAL:
            self.completed_at = at
        return True

    def notify(self, event: str, template: str, at: datetime) -> None:
        if at > self.filler.now:
            return
        ring = self.filler.ring
        note_id = str(uuid.uuid4())
        sent = at + timedelta(seconds=0.5 + self.rng.expovariate(1 / 5))
        done = sent <= self.filler.now
        self.filler.rows[NotificationRow].append(
            {
                "id": note_id,
                "request_id": self.id,
                "event": event,
                "template": template,
                "recipient_enc": ring.encrypt(
                    self.subject["email"].encode(), context=note_id.encode()
                ),
                "context_enc": ring.encrypt_json(
                    {"request_id": self.id, "type": self.kind}, context=note_id.encode()
                ),
                "status": "sent" if done else "pending",
                "attempts": 1 if done else 0,
                "last_error": None,
                "message_id": f"<{note_id}@privacy.allego.example>",
                "created_at": at,
                "updated_at": sent if done else None,
                "claimed_until": None,
                "sent_at": sent if done else None,
            }
        )
        if done:
            self.record(sent, "email_sent", event=event, notification_id=note_id)

    def phase(self, phase: str, stores: list[str], fails: str | None) -> tuple[datetime, str]:
        """One task per store, started at `self.t`. Returns when the phase ended and how:
        'done', 'running' (a task ends after now), or the store that failed for good
        (the request stops when that task fails, whatever the others do)."""
        start, rng, now = self.t, self.rng, self.filler.now
        last_end, failed_at, running = start, None, False
        for store in stores:
            claimed = start + self.wait(start)
            call_ms = max(1, round(rng.lognormvariate(math.log(STORE_MEDIAN_MS[store]), 0.6)))
            attempts, error = 1, None
            end = claimed + timedelta(milliseconds=call_ms)
            if store == fails:  # every attempt errors, with the backoff between them
                attempts, error = MAX_ATTEMPTS, rng.choice(ERRORS)
                end += timedelta(seconds=sum(min(2**a, 300) for a in range(MAX_ATTEMPTS)))
            elif rng.random() < RETRIED:
                attempts, error = 2, rng.choice(ERRORS)
                end += timedelta(seconds=1 + rng.random() * 2)
            task: dict[str, Any] = {
                "id": self.filler.new_id(StoreTaskRow),
                "request_id": self.id,
                "store": store,
                "phase": phase,
                "status": "pending",
                "attempts": 0,
                "last_error": None,
                "result": None,
                "detail_enc": None,
                "updated_at": start,
                "completed_at": None,
                "duration_ms": None,
            }
            if end > now:
                running = True
                if claimed <= now:  # a worker has it: one attempt under way
                    task.update(attempts=1, updated_at=claimed)
            elif store == fails:
                failed_at = end
                task.update(
                    status="failed",
                    attempts=attempts,
                    last_error=error,
                    updated_at=end,
                    duration_ms=call_ms,
                )
                self.record(
                    end,
                    "store_task_failed",
                    store=store,
                    phase=phase,
                    attempts=attempts,
                    reason=error,
                )
            else:
                result = self.result(phase)
                task.update(
                    status="done",
                    attempts=attempts,
                    last_error=error,  # a retried task keeps its last error
                    result=result,
                    updated_at=end,
                    completed_at=end,
                    duration_ms=call_ms,
                )
                if phase == "locate":
                    task["detail_enc"] = self.located()
                last_end = max(last_end, end)
            self.filler.rows[StoreTaskRow].append(task)
        if failed_at is not None:
            return failed_at, str(fails)
        return last_end, "running" if running else "done"

    def located(self) -> bytes:
        """What locating found (record refs, discovered ids), encrypted as the pipeline
        does: one ciphertext per request, shared by its stores (only its size matters)."""
        if self.detail is None:
            self.detail = self.filler.ring.encrypt_json(
                {"refs": [["users", str(uuid.uuid4()), None, False]] * 3, "discovered_ids": {}},
                context=self.id.encode(),
            )
        return self.detail

    def result(self, phase: str) -> dict[str, Any]:
        n = self.rng.randint(1, 12)
        if phase == "locate":
            return {"records": n, "erasable": n - 1, "retained": 1, "collections": {"users": n}}
        if phase == "recheck":
            return {"remaining": 0, "retained": 1}
        by_kind: dict[str, dict[str, Any]] = {
            "access": {"records": n, "bytes": n * 900},
            "correct": {"applied": ["job_title"], "changes": 1, "not_held": []},
            "erase": {"deleted": n - 1, "anonymized": 0, "retained": ["invoices"]},
            "opt_out": {"updated": 1},
        }
        return by_kind[self.kind]

    def stop(self, store: str, phase: str) -> None:
        words = {"locate": "searching", "act": "acting on", "recheck": "re-checking"}[phase]
        reason = (
            f"{words} store {store!r} failed after {MAX_ATTEMPTS} attempt(s): "
            f"{self.rng.choice(ERRORS)}"
        )
        if self.move(State.NEEDS_ATTENTION, self.later(1), reason) and (
            self.rng.random() < CANCELLED_LATER
        ):
            self.move(
                State.CANCELLED,
                self.t + timedelta(hours=self.rng.uniform(12, 60)),
                "the person withdrew the request",
                actor="bench-officer",
            )

    def live(self) -> None:
        rng, filler = self.rng, self.filler
        self.move(State.RECEIVED, self.received, None)
        self.record(
            self.received,
            "request_received",
            type=self.kind,
            jurisdiction=self.jurisdiction,
            channel=self.channel,
            due_at=self.due.isoformat(),
            verified_by=None,
        )
        self.notify("acknowledgement", "acknowledgement", self.received)
        verified_by = "not_required"
        if needs_verification(RequestType(self.kind)):
            verified_by = "assertion:allego-app"
            if rng.random() < EMAIL_LINK:
                verified_by = "email_link"
                self.move(
                    State.AWAITING_VERIFICATION,
                    self.later(2),
                    "confirmation link mailed to the address on the request",
                )
                self.notify("verification", "verification", self.t)
                if rng.random() < NEVER_CONFIRMED:
                    self.move(
                        State.EXPIRED,
                        self.t + timedelta(hours=72),
                        "the confirmation link was never used",
                    )
                else:
                    click = self.t + timedelta(minutes=rng.lognormvariate(math.log(120), 1.0))
                    if self.move(State.VERIFIED, click, "the person confirmed by email link"):
                        self.record(self.t, "identity_verified", method="email_link")
        if self.state == State.RECEIVED.value:
            self.move(
                State.VERIFIED,
                self.later(2),
                "verified by signed assertion"
                if verified_by.startswith("assertion:")
                else "no verification needed for this request type",
            )
        if self.state == State.VERIFIED.value:
            if self.kind == "concern":
                self.concern()
            else:
                self.stores()
        if self.state == State.NOTIFYING.value:
            self.finish()
        filler.states[self.state or "?"] += 1
        verified = self.state not in (
            State.RECEIVED.value,
            State.AWAITING_VERIFICATION.value,
            State.EXPIRED.value,
        )
        payload: dict[str, Any] = {}
        if self.kind == "correct":
            payload["corrections"] = [["job_title", "Head of Enablement"]]
        if self.kind == "concern":
            payload["concern"] = {"message": "Why do you keep emailing me?"}
        context = self.id.encode()
        filler.rows[RequestRow].append(
            {
                "id": self.id,
                "type": self.kind,
                "jurisdiction": self.jurisdiction,
                "channel": self.channel,
                "state": self.state,
                "state_reason": self.reason,
                "subject_hash": filler.blind.email(self.subject["email"]),
                "subject_enc": filler.ring.encrypt_json(self.subject, context=context),
                "payload_enc": filler.ring.encrypt_json(payload, context=context)
                if payload
                else None,
                "content_hash": hashlib.sha256(self.id.encode()).hexdigest(),
                "schema_version": contract.SCHEMA_ID,
                "received_at": self.received,
                "due_at": self.due,
                "original_due_at": self.due,
                "extension_reason": None,
                "verified_by": verified_by if verified else None,
                "verified_at": self.verified_at,
                "linked_to": None,
                "outcome": self.outcome,
                "created_at": self.received,
                "updated_at": self.updated_at,
                "completed_at": self.completed_at,
            }
        )
        filler.chain(self.audit)

    def concern(self) -> None:
        if not self.move(State.ACTING, self.later(), "nothing to search for a concern"):
            return
        case_id = str(uuid.uuid4())
        self.filler.rows[CaseRow].append(
            {
                "id": case_id,
                "request_id": self.id,
                "status": "open" if self.rng.random() < 0.3 else "closed",
                "due_at": min(self.due, self.received + policy.CONCERN_RESPONSE),
                "message_enc": self.filler.ring.encrypt(
                    b"Why do you keep emailing me?", context=case_id.encode()
                ),
                "reply_enc": None,
                "opened_at": self.t,
                "closed_at": None,
            }
        )
        self.record(self.t, "case_opened", case_id=case_id)
        self.move(State.NOTIFYING, self.t, "a case was opened for the privacy team")

    def stores(self) -> None:
        rng = self.rng
        self.move(State.LOCATING, self.later(), f"searching {len(STORES)} product store(s)")
        if not self.alive:
            return
        stops = rng.random() < STOPS
        holding = [s for s in STORES if rng.random() < HOLDS_PERSON] or [rng.choice(STORES)]
        fail_phase = rng.choice(("locate", "act")) if stops else None
        fails = rng.choice(STORES if fail_phase == "locate" else holding) if stops else None
        ended, how = self.phase("locate", STORES, fails if fail_phase == "locate" else None)
        self.t = ended
        if how != "done":
            if how != "running":
                self.stop(how, "locate")
            return
        if not self.move(State.ACTING, self.later(1), "every product store was searched"):
            return
        ended, how = self.phase("act", holding, fails if fail_phase == "act" else None)
        self.t = ended
        if how == "done" and self.kind == "erase":
            self.t = self.later(2)
            if self.t > self.filler.now:
                return
            ended, how = self.phase("recheck", holding, None)
            self.t = ended
        if how != "done":
            if how != "running":
                self.stop(how, "act")
            return
        if self.kind == "access" and self.t <= self.filler.now:
            size = self.rng.randint(20_000, 2_000_000)
            self.filler.rows[ExportRow].append(
                {
                    "id": str(uuid.uuid4()),
                    "request_id": self.id,
                    "path": f"/srv/privacy/exports/{self.id}.zip.enc",
                    "size": size,
                    "sha256": hashlib.sha256(self.id.encode()).hexdigest(),
                    "created_at": self.t,
                    "expires_at": self.t + timedelta(days=7),
                    "revoked_at": None,
                    "downloads": self.rng.randint(0, 2),
                }
            )
            self.record(self.t, "export_created", size=size)
        self.move(State.NOTIFYING, self.later(2), "every store was acted on")

    def finish(self) -> None:
        if self.move(State.DONE, self.later(5), "outcome mailed to the person"):
            self.outcome = {"stores": {}, "retained": 0}
            self.notify("outcome", f"outcome_{self.kind}", self.t)


def fill(app: App, opts: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(opts.seed)
    now = datetime.now(UTC)
    filler = Filler(app, now, rng)
    arrivals = arrival_times(rng, opts.requests, now, opts.days, opts.last_day_share)
    started = time.perf_counter()
    step = max(1, opts.requests // 10)
    for index, received in enumerate(arrivals, start=1):
        filler.add_request(index, received)
        if index % opts.chunk == 0:
            filler.flush()
        if index % step == 0:
            print(f"   {index:>7} requests, {time.perf_counter() - started:6.1f} s", flush=True)
    filler.finish()
    filled = time.perf_counter() - started
    analyzed = 0.0
    if app.engine.dialect.name == "postgresql":
        # ANALYZE, as autovacuum soon would; no VACUUM unless asked: the visibility map
        # stays unset, as it is for the recently updated rows the dashboard reads most,
        # so index-only scans still visit the table
        began = time.perf_counter()
        with app.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE" if opts.vacuum else "ANALYZE"))
        analyzed = time.perf_counter() - began
    return {
        "fill_s": round(filled, 1),
        "analyze_s": round(analyzed, 1),
        "now": now.isoformat(),
        "rows": dict(filler.inserted),
        "states": dict(filler.states),
    }


# -- measuring ---------------------------------------------------------------------------


@dataclass
class SqlMeter:
    """Time spent in the database driver, and the statements sent, per page."""

    seconds: float = 0.0
    count: int = 0
    capture: list[tuple[str, Any]] | None = None
    _started: list[float] = field(default_factory=list)

    def install(self, engine: sa.Engine) -> None:
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0

    def _before(self, _c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        self._started.append(time.perf_counter())
        if self.capture is not None:
            self.capture.append((statement, parameters))

    def _after(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._started.pop()
        self.count += 1


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def sign_in(web_client: FlaskClient, name: str) -> FlaskClient:
    page = web_client.get("/signin").get_data(as_text=True)
    found = re.search(
        r'action="/signin"[^>]*>\s*<input type="hidden" name="csrf" value="([^"]+)"', page
    )
    assert found, "the sign-in page has its form"
    response = web_client.post(
        "/signin", data={"csrf": found.group(1), "name": name, "password": PASSWORD}
    )
    assert response.status_code == 302, f"{name} could not sign in"
    return web_client


def next_page(page: str) -> str | None:
    found = re.search(r'id="next-page" href="([^"]+)"', page)
    return html.unescape(found.group(1)) if found else None


@dataclass
class Page:
    name: str
    role: str
    path: str


def pick_ids(app: App) -> dict[str, str]:
    """A few requests to open: finished ones of each kind, a stopped one, one in flight."""
    wanted = {
        "access, done": (RequestRow.type == "access", RequestRow.state == "done"),
        "erase, done": (RequestRow.type == "erase", RequestRow.state == "done"),
        "needs_attention": (RequestRow.state == "needs_attention",),
        "in flight": (RequestRow.state.in_(["locating", "acting"]),),
        "concern, done": (RequestRow.type == "concern", RequestRow.state == "done"),
    }
    found = {}
    with app.engine.connect() as conn:
        for label, where in wanted.items():
            request_id = conn.execute(
                sa.select(RequestRow.id).where(*where).order_by(RequestRow.id).limit(1)
            ).scalar()
            if request_id is not None:
                found[label] = request_id
    return found


def plan_pages(app: App, viewer: FlaskClient, deep: int) -> tuple[list[Page], dict[str, Any]]:
    store = "marketing"
    week = (datetime.now(UTC) + timedelta(days=7)).date().isoformat()
    pages = [
        Page("overview /", "viewer", "/"),
        Page("list, first page", "viewer", "/requests"),
        Page("list, first page, masked", "officer", "/requests"),
        Page("list state=needs_attention", "viewer", "/requests?state=needs_attention"),
        Page("list state=done", "viewer", "/requests?state=done"),
        Page("list type=erase", "viewer", "/requests?type=erase"),
        Page(f"list store={store}", "viewer", f"/requests?store={store}"),
        Page("list jurisdiction=ccpa", "viewer", "/requests?jurisdiction=ccpa"),
        Page(f"list due_before={week}", "viewer", f"/requests?due_before={week}"),
        Page(
            f"list state+store={store}",
            "viewer",
            f"/requests?state=needs_attention&store={store}",
        ),
        Page(
            "list type+jurisdiction+store",
            "viewer",
            f"/requests?type=access&jurisdiction=other&store={store}",
        ),
    ]
    # follow the cursor `deep` pages
    path: str | None = "/requests"
    walked = 0
    began = time.perf_counter()
    while path is not None and walked < deep:
        response = viewer.get(path)
        assert response.status_code == 200, path
        path = next_page(response.get_data(as_text=True))
        walked += 1
    walk_s = time.perf_counter() - began
    if path is not None:
        pages.insert(2, Page(f"list, page {walked + 1} (cursor)", "viewer", path))
    ids = pick_ids(app)
    for label, request_id in ids.items():
        pages.append(Page(f"request page ({label})", "viewer", f"/requests/{request_id}"))
    for label, request_id in ids.items():
        pages.append(Page(f"request page ({label}), masked", "officer", f"/requests/{request_id}"))
    pages.append(Page("/metrics", "anyone", "/metrics"))
    return pages, {"deep_pages_walked": walked, "deep_walk_s": round(walk_s, 2), "ids": ids}


def time_pages(
    clients: dict[str, FlaskClient], pages: list[Page], meter: SqlMeter, repeat: int
) -> dict[str, dict[str, Any]]:
    out = {}
    for page in pages:
        client = clients[page.role]
        first = client.get(page.path)  # warm-up: templates compiled, statements cached
        assert first.status_code == 200, (page.path, first.status_code)
        wall: list[float] = []
        sql: list[float] = []
        for _ in range(repeat):
            meter.reset()
            began = time.perf_counter()
            response = client.get(page.path)
            wall.append((time.perf_counter() - began) * 1000)
            sql.append(meter.seconds * 1000)
            assert response.status_code == 200, (page.path, response.status_code)
        out[page.name] = {
            "role": page.role,
            "path": page.path,
            "p50_ms": round(statistics.median(wall), 1),
            "p95_ms": round(percentile(wall, 0.95), 1),
            "max_ms": round(max(wall), 1),
            "sql_p50_ms": round(statistics.median(sql), 1),
            "statements": meter.count,
            "bytes": len(first.data),
        }
        row = out[page.name]
        print(
            f"   {page.name:<44} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
            f"{row['sql_p50_ms']:>8.1f} {row['statements']:>4}",
            flush=True,
        )
    return out


def plans(
    app: App, clients: dict[str, FlaskClient], pages: list[Page], meter: SqlMeter
) -> list[dict[str, str]]:
    """The plan of every distinct SELECT the overview, the lists and /metrics send
    (the operator session look-ups left out)."""
    wanted = [p for p in pages if p.path.startswith(("/requests?", "/metrics")) or p.path == "/"]
    wanted += [p for p in pages if p.path == "/requests" and p.role == "viewer"]
    seen: dict[str, tuple[str, Any]] = {}
    for page in wanted:
        meter.capture = []
        clients[page.role].get(page.path)
        for statement, parameters in meter.capture:
            text = statement.lstrip()
            if not text.upper().startswith("SELECT") or "operator" in text:
                continue
            seen.setdefault(statement, (page.name, parameters))
        meter.capture = None
    out = []
    for statement, (page_name, parameters) in seen.items():
        plan = explain(app.engine, app.engine.dialect.name, statement, parameters, analyze=True)
        out.append({"page": page_name, "sql": " ".join(statement.split()), "plan": plan})
    return out


def print_plans(found: list[dict[str, str]]) -> None:
    for item in found:
        print(f"\n-- {item['page']}: {item['sql'][:160]}")
        for line in item["plan"].splitlines()[:14]:
            print(f"   {line}")


# -- one backend -------------------------------------------------------------------------


@contextmanager
def built_app(backend: str, folder: Path, opts: argparse.Namespace) -> Iterator[App]:
    with state_database(backend, folder, opts.pg_admin_url) as url:
        settings = Settings(
            data_dir=folder / "data",
            database_url=url,
            smtp_port=1,
            queue_namespace=f"bench-dash-{uuid.uuid4().hex[:8]}",  # empty queues
        )
        app = App(settings)
        try:
            upgrade(app.engine)
            yield app
        finally:
            app.close()


def run_backend(backend: str, opts: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {backend}: {opts.requests} requests", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="dashboard-scale-") as tmp,
        built_app(backend, Path(tmp), opts) as app,
    ):
        built = fill(app, opts)
        print(
            f"-- filled in {built['fill_s']} s"
            + (f" (+ ANALYZE {built['analyze_s']} s)" if backend != "sqlite" else "")
            + f": {built['rows']}\n-- states: {built['states']}",
            flush=True,
        )
        for name, role in OPERATORS.items():
            create_operator(app, name, role, PASSWORD, actor="bench", cost=SCRYPT_FAST)
        web = create_dashboard(app)
        clients = {
            "viewer": sign_in(web.test_client(), "bench-viewer"),
            "officer": sign_in(web.test_client(), "bench-officer"),
            "anyone": web.test_client(),
        }
        meter = SqlMeter()
        meter.install(app.engine)
        pages, walk = plan_pages(app, clients["viewer"], opts.deep)
        print(
            f"-- followed the cursor {walk['deep_pages_walked']} pages in {walk['deep_walk_s']} s;"
            f" timing {len(pages)} pages x {opts.repeat}",
            flush=True,
        )
        print(f"   {'page':<44} {'p50 ms':>8} {'p95 ms':>8} {'sql ms':>8} {'stmt':>4}")
        load_before = os.getloadavg()
        timed = time_pages(clients, pages, meter, opts.repeat)
        load = {"before": load_before, "after": os.getloadavg()}
        print(f"-- load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
        found = [] if opts.no_plans else plans(app, clients, pages, meter)
        if found:
            print_plans(found)
        return {**built, **walk, "load_average": load, "pages": timed, "plans": found}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    backends = list(results)
    names = list(dict.fromkeys(n for r in results.values() for n in r["pages"]))
    head = f"{'page':<46}" + "".join(f"{b + ' p50 / p95 ms':>28}" for b in backends)
    print("\n" + head + "\n" + "-" * len(head))
    for name in names:
        cells = []
        for backend in backends:
            row = results[backend]["pages"].get(name)
            cells.append(f"{row['p50_ms']:>12.1f} / {row['p95_ms']:<9.1f}" if row else " " * 24)
        print(f"{name:<46}" + "".join(f"{c:>28}" for c in cells))
    fills = "; ".join(f"{b} {r['fill_s']} s" for b, r in results.items())
    print(f"\nfill time: {fills}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--database", choices=("both", "sqlite", "postgresql"), default="both")
    parser.add_argument("--repeat", type=int, default=10, help="timed samples per page")
    parser.add_argument("--days", type=float, default=90, help="requests received over")
    parser.add_argument(
        "--last-day-share",
        type=float,
        default=0.1,
        help="share of the requests received in the last 24 hours",
    )
    parser.add_argument("--deep", type=int, default=50, help="pages to follow the cursor")
    parser.add_argument("--chunk", type=int, default=2000, help="requests per transaction")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--no-plans", action="store_true", help="skip the EXPLAIN output")
    parser.add_argument(
        "--vacuum", action="store_true", help="PostgreSQL: VACUUM ANALYZE, not only ANALYZE"
    )
    opts = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    backends = ("sqlite", "postgresql") if opts.database == "both" else (opts.database,)
    results = {backend: run_backend(backend, opts) for backend in backends}
    print_table(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"dashboard-scale-{stamp}.json"
    report = {
        "options": {k: v for k, v in vars(opts).items() if k != "pg_admin_url"},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"results: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
