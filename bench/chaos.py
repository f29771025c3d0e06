"""Fault harness: a stream of requests of all five types through real workers while
faults are injected, then the figures that prove nothing was lost or doubled.

    .venv/bin/python bench/chaos.py --requests 1000 --seed 7        # the full run
    .venv/bin/python bench/chaos.py --requests 100 --seed 3         # what CI runs
    .venv/bin/python bench/chaos.py --database postgresql --broker rabbitmq

Faults (seeded, repeatable schedule; each kind at least once):
- `kill_worker`: `kill -9` of a random dramatiq worker process mid-task (dramatiq then
  stops its group; the harness restarts it, as a supervisor would);
- `restart_redis` (Redis broker): the broker's Redis killed and started empty (no
  persistence): every queued, delayed and in-flight message is gone, and the state
  database brings them back;
- `restart_rabbitmq` (RabbitMQ broker): the harness's own RabbitMQ node stops its
  application (every connection cut) and starts again; durable queues and persistent
  messages come back, in-flight deliveries are delivered again;
- `restart_postgres` (PostgreSQL state DB): the harness's own PostgreSQL cluster stopped
  with `-m immediate` (every connection cut mid-transaction, no checkpoint), down for a
  moment, then started (crash recovery);
- `smtp_refuse`, `smtp_hang`: the mail server refuses (451), then does not answer in time;
- `store_down`, `store_hang`, `store_errors`: the CRM's REST service refuses connections,
  answers later than the connector's timeout, or answers 503.

The harness plays the intake system too: a request whose submission vanished with the
broker before intake took it is submitted again with the same request id (intake is
idempotent), exactly as the contract asks of intake systems.

Afterwards it checks and prints: every request `done` or `needs_attention` with a reason;
0 lost; 0 duplicate emails (by Message-ID, counted at the SMTP server); 0 duplicate
exports; every erasure verified by locating again; every due date right.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from connectors.allego.seed import seed_demo_stores, sqlite_path
from pipeline import contract, policy
from pipeline.bootstrap import App
from pipeline.db import ExportRow, RequestRow, StoreTaskRow
from pipeline.intake import submit
from pipeline.mailsink import MailSink, free_port
from pipeline.migrate import upgrade
from pipeline.services import PrivatePostgres, PrivateRabbitmq
from pipeline.settings import Settings
from pipeline.stack import LocalStack
from pipeline.states import Jurisdiction

CRM_TOKEN = "test-token-5f2c"  # the fake service's token (tests/.../fake_product_api.py)

FAULTS = (
    "kill_worker",
    "restart_redis",
    "smtp_refuse",
    "smtp_hang",
    "store_down",
    "store_hang",
    "store_errors",
)
BROKER_RESTART = {"redis": "restart_redis", "rabbitmq": "restart_rabbitmq"}


def fault_kinds(database: str = "sqlite", broker: str = "redis") -> tuple[str, ...]:
    """Every fault that applies to this stack: the broker's own restart, and a restart of
    the state database when it is a server (PostgreSQL)."""
    kinds = tuple(BROKER_RESTART[broker] if k == "restart_redis" else k for k in FAULTS)
    return kinds + (("restart_postgres",) if database == "postgresql" else ())


REPO = Path(__file__).resolve().parent.parent
ALLEGO = REPO / "connectors" / "allego"
CRM_MAPPING = REPO / "tests" / "integration" / "connectors" / "crm_http.toml"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: `bench` and the fake CRM service (tests/)

from bench.throughput import state_database  # noqa: E402

KINDS = ("access", "correct", "erase", "opt_out", "concern")
FINAL = {"done", "needs_attention", "expired", "cancelled"}


class OwnRedis:
    """A Redis of the harness's own, on a free port, that keeps nothing on disk."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()


class ProductService:
    """A product's REST service (the CRM) behind the HTTP connector, that the harness can
    take down (connection refused), make hang (no answer in time) or make fail (503)."""

    def __init__(self, emails: list[str]):
        from tests.integration.connectors.fake_product_api import FakeProductApi

        self.api = FakeProductApi()
        for i, email in enumerate(emails):
            uid = f"u-{i:05d}"
            self.api.users[uid] = {
                "id": uid,
                "email": email,
                "name": f"CRM person {i}",
                "newsletter": True,
                "password_hash": f"scrypt${i}",
            }
            self.api.notes[f"n-{i}"] = {"id": f"n-{i}", "user_id": uid, "text": f"call {i}"}
            self.api.receipts[f"r-{i}"] = {"id": f"r-{i}", "user_id": uid, "amount": "9.00"}
        self.port = free_port()
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> ProductService:
        from http.server import ThreadingHTTPServer

        from tests.integration.connectors.fake_product_api import _handler

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self.api))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def write_stores_config(data_dir: Path, crm_url: str) -> Path:
    """The six Allego stores plus the CRM behind its REST service."""
    text = (ALLEGO / "stores.toml").read_text()
    text = re.sub(
        r'mapping = "([^"/]+\.toml)"', lambda m: f'mapping = "{ALLEGO / m.group(1)}"', text
    )
    text += (
        f'\n[stores.crm]\nconnector = "http"\nbase_url = "{crm_url}"\n'
        f'token_env = "CHAOS_CRM_TOKEN"\nmapping = "{CRM_MAPPING}"\ntimeout = 2\n'
        "max_attempts = 2\nbackoff_base = 0.2\nbackoff_max = 1\nrate_limit = 500\n"
    )
    path = data_dir / "stores.toml"
    path.write_text(text)
    return path


@dataclass
class Report:
    requests: int
    seed: int
    database: str
    broker: str = "redis"
    faults: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    needs_attention: dict[str, str] = field(default_factory=dict)
    duplicate_emails: dict[str, int] = field(default_factory=dict)
    # duplicates NOT explained by a worker killed, or the state database crashing, between
    # the mail server's acceptance and the commit that records it (the one window SMTP
    # leaves; see README "Guarantees")
    duplicate_emails_unexplained: dict[str, int] = field(default_factory=dict)
    missing_emails: list[str] = field(default_factory=list)
    duplicate_exports: int = 0
    erasures: int = 0
    erasures_unverified: list[str] = field(default_factory=list)
    wrong_deadlines: list[str] = field(default_factory=list)
    crm_left_after_erasure: int = 0  # people erased but still in the CRM service
    resubmitted: int = 0
    # requests the reconciler found stalled and re-sent (a storm of these, say while the
    # broker still holds a backlog, only makes the queue longer)
    rekicked: int = 0
    worker_restarts: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.needs_attention
            or self.duplicate_emails_unexplained
            or self.missing_emails
            or self.duplicate_exports
            or self.erasures_unverified
            or self.wrong_deadlines
            or self.crm_left_after_erasure
        )


def _people(data_dir: Path) -> list[str]:
    """Emails of seeded people, in a stable order (video users, then marketing leads)."""
    emails: list[str] = []
    for store, table in (("video", "users"), ("marketing", "leads"), ("learning", "learners")):
        engine = sa.create_engine(f"sqlite:///{sqlite_path(data_dir, store)}")
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT email FROM {table} ORDER BY email")).scalars()
            emails += [e.strip().lower() for e in rows if e and "@" in e]
        engine.dispose()
    return sorted(dict.fromkeys(emails))


def build_batch(
    app: App, emails: list[str], count: int, rng: random.Random
) -> list[dict[str, Any]]:
    """Documents of all five types; each request gets a person of its own, so no two
    requests race on one person's data."""
    if len(emails) < count:
        raise ValueError(f"need {count} seeded people, have {len(emails)}")
    chosen = rng.sample(emails, count)
    key = app.keys.intake_keys["allego-app"]
    docs = []
    for i, email in enumerate(chosen):
        kind = KINDS[i % len(KINDS)]
        rid = f"chaos-{i:05d}-{kind}"
        doc: dict[str, Any] = {
            "schema": contract.SCHEMA_ID,
            "request_id": rid,
            "type": kind,
            "subject": {"email": email},
            "jurisdiction": rng.choice(["gdpr", "ccpa", "other"]),
            "received_at": datetime.now(UTC).isoformat(),
            "channel": "web",
        }
        if kind == "correct":
            doc["corrections"] = [{"field": "job_title", "value": f"Title {i}"}]
        if kind == "concern":
            doc["concern"] = {"message": f"Concern number {i}"}
        if kind in ("access", "correct", "erase"):
            doc["verification"] = contract.sign_assertion(
                key,
                request_id=rid,
                kind=kind,
                email=email,
                system="allego-app",
                expires_at=datetime.now(UTC) + timedelta(hours=2),
            )
        docs.append(doc)
    rng.shuffle(docs)
    return docs


def schedule(
    rng: random.Random, span: float, faults: tuple[str, ...], count: int
) -> list[tuple[float, str]]:
    kinds = list(faults) + [rng.choice(faults) for _ in range(max(0, count - len(faults)))]
    return sorted((rng.uniform(0.1 * span, 0.8 * span), kind) for kind in kinds)


class Chaos:
    """Applies one fault at a time and clears it after `hold` seconds."""

    def __init__(
        self,
        stack: LocalStack,
        broker: OwnRedis | PrivateRabbitmq,
        sink: MailSink,
        crm: ProductService,
        rng: random.Random,
        hold: float,
        postgres: PrivatePostgres | None = None,
    ):
        self.stack, self.broker, self.sink, self.rng, self.hold = stack, broker, sink, rng, hold
        self.crm, self.postgres = crm, postgres
        self.clear_at: float | None = None
        self.counts: Counter[str] = Counter()
        self.kills: list[float] = []  # wall-clock times of kill -9
        self.outages: list[tuple[float, float]] = []  # state DB down, wall clock (from, to)

    def inject(self, kind: str) -> None:
        self.counts[kind] += 1
        if kind == "kill_worker":
            pids = self.stack.worker_pids()
            if pids:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
                self.kills.append(time.time())
        elif kind == "restart_redis":
            assert isinstance(self.broker, OwnRedis)
            self.broker.restart_empty()
        elif kind == "restart_rabbitmq":
            assert isinstance(self.broker, PrivateRabbitmq)
            self.broker.restart(down_seconds=self.rng.uniform(0.5, 2.0))
        elif kind == "restart_postgres":
            assert self.postgres is not None
            crashed = time.time()
            self.postgres.crash()
            time.sleep(self.rng.uniform(0.5, 2.0))  # down, as while a server reboots
            self.postgres.start()
            self.outages.append((crashed, time.time()))
        elif kind in ("smtp_refuse", "smtp_hang"):
            self.sink.set_fault(kind.removeprefix("smtp_"), hang_seconds=self.hold + 5)
        elif kind == "store_down":
            self.crm.stop()
        elif kind == "store_hang":
            self.crm.api.stall_seconds = 3.0  # longer than the connector's 2 s timeout
        elif kind == "store_errors":
            self.crm.api.fail_next(40, 503)
        if not kind.startswith(("kill_", "restart_")):
            self.clear_at = time.monotonic() + self.hold
        print(f"   fault: {kind}", flush=True)

    def tick(self) -> None:
        if self.clear_at is not None and time.monotonic() >= self.clear_at:
            self.sink.set_fault("none")
            self.crm.api.stall_seconds = 0.0
            if self.crm.server is None:
                self.crm.start()
            self.clear_at = None


def _settle(
    app: App,
    stack: LocalStack,
    docs: list[dict[str, Any]],
    chaos: Chaos,
    faults: list[tuple[float, str]],
    span: float,
    timeout: float,
    report: Report,
) -> None:
    started = time.monotonic()
    submitted: dict[str, float] = {}
    pending_docs = list(docs)
    rids = [d["request_id"] for d in docs]
    while True:
        now = time.monotonic() - started
        due = int(len(docs) * min(1.0, now / (0.6 * span))) - len(submitted)
        for _ in range(min(len(pending_docs), max(0, due))):  # a steady stream over the span
            doc = pending_docs.pop(0)
            _submit(app, doc)
            submitted[doc["request_id"]] = time.monotonic()
        while faults and faults[0][0] <= now:
            chaos.inject(faults.pop(0)[1])
        chaos.tick()
        report.worker_restarts += len(stack.revive())
        try:
            with app.sessions() as session:
                states = dict(
                    session.execute(
                        sa.select(RequestRow.id, RequestRow.state).where(RequestRow.id.in_(rids))
                    ).all()
                )
        except OperationalError:  # the state database is restarting: look again soon
            time.sleep(0.25)
            continue
        for rid, at in submitted.items():  # the intake system's duty: resubmit until known
            if rid not in states and time.monotonic() - at > 10:
                _submit(app, next(d for d in docs if d["request_id"] == rid))
                submitted[rid] = time.monotonic()
                report.resubmitted += 1
        done = (
            not pending_docs
            and not faults
            and chaos.clear_at is None
            and all(states.get(r) in FINAL for r in rids)
        )
        if done or now > timeout:
            return
        time.sleep(0.25)


def _submit(app: App, doc: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # the broker is restarting: resubmitted later
        submit(doc, bus=app.bus)


KILL_WINDOW = 3.0  # seconds between a mail's acceptance and a crash that explains a copy


def _arrivals(folder: Path) -> dict[str, list[float]]:
    """When each Message-ID reached the mail server (the sink names files by UTC time)."""
    parser = BytesHeaderParser()
    found: dict[str, list[float]] = {}
    for path in sorted(folder.glob("*.eml")):
        stamp = datetime.strptime(path.name.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ")
        with path.open("rb") as f:
            message_id = str(parser.parse(f)["Message-ID"])
        found.setdefault(message_id, []).append(stamp.replace(tzinfo=UTC).timestamp())
    return found


def _check(
    app: App, sink: MailSink, docs: list[dict[str, Any]], crashes: list[float], report: Report
) -> None:
    """`crashes`: when a worker was killed or the state database went down (wall clock)."""
    rids = {d["request_id"]: d for d in docs}
    with app.sessions() as session:
        rows = {
            r.id: r
            for r in session.execute(
                sa.select(RequestRow).where(RequestRow.id.in_(list(rids)))
            ).scalars()
        }
        exports = Counter(e.request_id for e in session.execute(sa.select(ExportRow)).scalars())
        tasks = list(
            session.execute(
                sa.select(StoreTaskRow).where(StoreTaskRow.request_id.in_(list(rids)))
            ).scalars()
        )
    report.states = dict(Counter(r.state for r in rows.values()))
    report.lost = sorted(set(rids) - {r for r, row in rows.items() if row.state in FINAL})
    report.needs_attention = {
        r: row.state_reason or "" for r, row in rows.items() if row.state == "needs_attention"
    }
    report.duplicate_exports = sum(n - 1 for n in exports.values() if n > 1)
    for rid, row in rows.items():
        received = datetime.fromisoformat(rids[rid]["received_at"])
        expected = policy.due_date(Jurisdiction(row.jurisdiction), received)
        if abs((row.due_at - expected).total_seconds()) > 1 or row.due_at != row.original_due_at:
            report.wrong_deadlines.append(rid)
        if row.type == "erase" and row.state == "done":
            report.erasures += 1
            erased = {t.store for t in tasks if t.request_id == rid and t.phase == "act"}
            rechecked = {
                t.store
                for t in tasks
                if t.request_id == rid
                and t.phase == "recheck"
                and t.status == "done"
                and (t.result or {}).get("remaining") == 0
            }
            if erased != rechecked:
                report.erasures_unverified.append(rid)
    arrivals = _arrivals(sink.folder)
    seen = Counter({mid: len(times) for mid, times in arrivals.items()})
    report.duplicate_emails = {mid: n for mid, n in seen.items() if n > 1}
    report.duplicate_emails_unexplained = {
        mid: n
        for mid, n in report.duplicate_emails.items()
        if not any(0 <= c - min(arrivals[mid]) <= KILL_WINDOW for c in crashes)
    }
    with app.sessions() as session:
        expected_ids = {
            n
            for (n,) in session.execute(
                sa.text("SELECT message_id FROM notifications WHERE status = 'sent'")
            )
        }
    report.missing_emails = sorted(expected_ids - set(seen))


def _create_database(postgres: PrivatePostgres, name: str) -> str:
    """A database on the harness's own cluster (gone with the cluster: no drop)."""
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return postgres.url(name)


def run(
    requests: int,
    seed: int,
    *,
    database: str = "sqlite",
    broker: str = "redis",
    processes: int = 2,
    threads: int = 4,
    faults: tuple[str, ...] | None = None,
    fault_count: int | None = None,
    timeout: float = 900,
    hold: float = 3.0,
    keep: bool = False,
) -> Report:
    faults = faults or fault_kinds(database, broker)
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="privacy-chaos-"))
    folder.chmod(0o711)  # PostgreSQL and RabbitMQ run as their own users under it,
    for private in ("data", "mail", "logs"):  # and may not read what holds people's data
        (folder / private).mkdir(mode=0o700)
    report = Report(requests=requests, seed=seed, database=database, broker=broker)
    began = time.monotonic()
    data_dir = folder / "data"
    seed_demo_stores(data_dir, people=max(200, requests * 2), seed=seed)
    try:
        with contextlib.ExitStack() as services:
            own_broker: OwnRedis | PrivateRabbitmq
            if broker == "rabbitmq":
                own_broker = PrivateRabbitmq(folder / "rabbitmq").start()
            else:
                own_broker = OwnRedis(folder / "redis").start()
            services.callback(own_broker.stop)
            postgres = None
            if database == "postgresql":
                postgres = PrivatePostgres(folder / "postgres").start()
                services.callback(postgres.stop)
                url = _create_database(postgres, "privacy_chaos")
            else:
                url = services.enter_context(state_database(database, folder, ""))
            sink = services.enter_context(MailSink(folder / "mail", port=0))
            env = {
                "PRIVACY_DATA_DIR": str(data_dir),
                "PRIVACY_DATABASE_URL": url,
                "PRIVACY_BROKER_URL": own_broker.url,
                "PRIVACY_SMTP_PORT": str(sink.port),
                "PRIVACY_SMTP_TIMEOUT": "2",
                "PRIVACY_RETRY_BASE_MS": "300",
                "PRIVACY_RETRY_MAX_MS": "3000",
                "PRIVACY_STALL_SECONDS": "6",
                "PRIVACY_SCHEDULER_INTERVAL": "1",
                "PRIVACY_STORE_MAX_ATTEMPTS": "12",
                "PRIVACY_LOG_FORMAT": "json",
            }
            people = _people(data_dir)
            crm = ProductService(people[::3]).start()  # a third of the people use the CRM
            env["PRIVACY_STORES_CONFIG"] = str(write_stores_config(data_dir, crm.url))
            env["CHAOS_CRM_TOKEN"] = CRM_TOKEN
            os.environ["CHAOS_CRM_TOKEN"] = CRM_TOKEN  # this process reads the stores too
            app = App(Settings.from_env(env))
            upgrade(app.engine)
            docs = build_batch(app, people, requests, rng)
            stack = LocalStack(
                env=env, log_dir=folder / "logs", processes=processes, threads=threads, web=False
            )
            span = max(20.0, requests / 3.0)  # about the time the batch takes here
            plan = schedule(rng, span, faults, fault_count or max(len(faults), requests // 25))
            chaos = Chaos(stack, own_broker, sink, crm, rng, hold, postgres)
            with stack:
                _settle(app, stack, docs, chaos, plan, span, timeout, report)
                sink.set_fault("none")
                time.sleep(1.5)  # let the last emails of finished requests leave
            report.faults = dict(chaos.counts)
            scheduler_log = (folder / "logs" / "scheduler.log").read_text(errors="replace")
            report.rekicked = scheduler_log.count('"event": "request_rekicked"')
            crashes = chaos.kills + [down for down, _up in chaos.outages]
            _check(app, sink, docs, crashes, report)
            erased = {d["subject"]["email"] for d in docs if d["type"] == "erase"}
            report.crm_left_after_erasure = sum(
                1 for u in crm.api.users.values() if u["email"] in erased
            )
            crm.stop()
            app.close()
    finally:
        report.seconds = round(time.monotonic() - began, 1)
        if not keep and report.ok:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"   kept {folder} for inspection")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"== fault harness: {args.requests} requests, seed {args.seed}, "
        f"{args.database}, {args.broker}"
    )
    report = run(
        args.requests,
        args.seed,
        database=args.database,
        broker=args.broker,
        processes=args.processes,
        threads=args.threads,
        timeout=args.timeout,
        keep=args.keep,
    )
    figures = asdict(report)
    print(json.dumps({k: v for k, v in figures.items() if k != "needs_attention"}, indent=2))
    for rid, reason in report.needs_attention.items():
        print(f"   needs attention: {rid}: {reason}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (results / f"chaos-{stamp}.json").write_text(json.dumps(figures, indent=2))
    print(f"== {'PASS' if report.ok else 'FAIL'}: {report.states} in {report.seconds}s")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
