"""Throughput of the privacy-request pipeline against a no-op run of the same topology.

    .venv/bin/python bench/throughput.py --requests 200 --processes 2 --threads 4 \
        [--worker-groups 1] [--database sqlite|postgresql] [--profile]

1. Real run: seeds the demo stores, migrates a fresh state database, starts a mail sink
   and the real worker and scheduler processes (`LocalStack`; `--worker-groups` of
   them, as on that many hosts, sharing the broker and the state DB), pushes a batch of
   pre-verified requests of mixed types and waits until every request is done and every
   mail has reached the sink.
2. No-op run: `dramatiq bench.noop_actors` with the same groups, processes and threads,
   the same actor names and queues, replaying the hops each request cost in the real
   run (read back from its store tasks), on its own queue namespace.
3. `--profile`: one in-process pass of a smaller batch through `pipeline.handlers.handle`
   under cProfile, to show where the time goes.

Prints a table and writes bench/results/throughput-<timestamp>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import email.policy
import io
import json
import logging
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `pipeline` importable
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from bench.procstats import GroupSnapshot, group_snapshot, machine_cpu  # noqa: E402
from bench.workload import (  # noqa: E402
    TYPE_MIX,
    BenchRequest,
    HopPlan,
    Person,
    document,
    noop_done_key,
    noop_last_done_key,
    plan_batch,
    seeded_people,
)
from connectors.allego.seed import seed_demo_stores  # noqa: E402
from pipeline.bootstrap import App, DramatiqBus, make_broker  # noqa: E402
from pipeline.db import NotificationRow, OutboxRow, RequestRow, StoreTaskRow  # noqa: E402
from pipeline.errors import TransientError  # noqa: E402
from pipeline.handlers import handle  # noqa: E402
from pipeline.intake import submit  # noqa: E402
from pipeline.mailsink import MailSink  # noqa: E402
from pipeline.migrate import upgrade  # noqa: E402
from pipeline.outbox import BATCH_MAX, Envelope  # noqa: E402
from pipeline.services import redis_answers  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.stack import LocalStack, group_names  # noqa: E402

RESULTS = REPO / "bench" / "results"
FINAL = ("done", "needs_attention", "expired", "cancelled")
WORKER_LOG_EVENTS = (
    "store_task_errored",
    "store_task_skipped",
    "intake_deferred",
    "outbox_publish_deferred",
    "email_deferred",
    "message_dropped",
    "Traceback",
    "database is locked",
)
SCHEDULER_LOG_EVENTS = ("request_rekicked", "reconciler_failed")


@dataclass(frozen=True)
class Options:
    requests: int
    processes: int
    threads: int
    database: str
    profile: bool
    profile_requests: int
    timeout: float
    broker_url: str
    pg_admin_url: str
    keep: bool
    worker_groups: int = 1  # worker process groups of `processes` x `threads` each


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="batch size (default 200)")
    p.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    p.add_argument(
        "--worker-groups",
        type=int,
        default=1,
        help="worker process groups, as on that many hosts, each of --processes (default 1)",
    )
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--profile", action="store_true", help="add an in-process cProfile pass")
    p.add_argument("--profile-requests", type=int, default=50, help="batch of the profile pass")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for a batch")
    p.add_argument(
        "--broker-url", default=os.environ.get("PRIVACY_BROKER_URL", Settings.broker_url)
    )
    p.add_argument(
        "--pg-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="where to CREATE/DROP the throwaway state database",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, mail)")
    a = p.parse_args(argv)
    return Options(
        a.requests,
        a.processes,
        a.threads,
        a.database,
        a.profile,
        a.profile_requests,
        a.timeout,
        a.broker_url,
        a.pg_admin_url,
        a.keep,
        a.worker_groups,
    )


# --------------------------------------------------------------------- shared helpers


@contextmanager
def state_database(backend: str, folder: Path, admin_url: str) -> Iterator[str]:
    """A fresh state database: a SQLite file, or a PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
        return
    name = f"privacy_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def pipeline_env(
    opts: Options, data_dir: Path, state_url: str, namespace: str, smtp_port: int
) -> dict[str, str]:
    return {
        "PRIVACY_DATA_DIR": str(data_dir),
        "PRIVACY_DATABASE_URL": state_url,
        "PRIVACY_BROKER_URL": opts.broker_url,
        "PRIVACY_QUEUE_NAMESPACE": namespace,
        "PRIVACY_SMTP_PORT": str(smtp_port),
    }


def seed_people(data_dir: Path, needed: int) -> tuple[list[Person], int]:
    """Seed the demo stores with enough people; returns them and the number of stores."""
    manifest = seed_demo_stores(data_dir, people=max(200, int(needed * 1.15) + 20))
    return seeded_people(data_dir), len(manifest.stores)


def split_people(people: list[Person], warmups: int) -> tuple[list[Person], list[Person]]:
    """Warm-up people apart from the batch's, so no batch request races a warm-up one."""
    return people[-warmups:], people[:-warmups]


def warmup_batch(people: list[Person], prefix: str) -> list[BenchRequest]:
    """One request of each type: every stage and store connection gets used once."""
    return [
        BenchRequest(f"{prefix}-{i:02d}", k, p)
        for i, (k, p) in enumerate(zip(TYPE_MIX, people, strict=False))
    ]


def drop_namespace(broker_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(broker_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def wait_until(
    check: Callable[[], tuple[bool, str]],
    *,
    timeout: float,
    label: str,
    alive: Callable[[], None] = lambda: None,
    interval: float = 0.1,
) -> bool:
    """Poll `check` until it says finished; print its progress every few seconds."""
    deadline = time.monotonic() + timeout
    next_print = time.monotonic() + 5
    status = ""
    while time.monotonic() < deadline:
        alive()
        finished, status = check()
        if finished:
            return True
        if time.monotonic() >= next_print:
            print(f"   {label}: {status}", flush=True)
            next_print += 5
        time.sleep(interval)
    print(f"!! {label}: timed out after {timeout:.0f}s: {status}", flush=True)
    return False


@dataclass
class Window:
    """CPU used by the worker process groups and by the whole machine between `start`
    and `stop`; the workers' figures are sums over every group."""

    workers: tuple[int, ...]  # the worker groups' process group ids
    others: dict[str, int] = field(default_factory=dict)  # name -> pgid, CPU only
    group_cpu: float = 0.0
    others_cpu: dict[str, float] = field(default_factory=dict)
    own_cpu: float = 0.0  # this process: submitting, polling, the mail sink's thread
    machine: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        self.group_cpu = group_snapshot(*self.workers).cpu_seconds
        self.others_cpu = {k: group_snapshot(g).cpu_seconds for k, g in self.others.items()}
        self.own_cpu = time.process_time()
        self.machine = machine_cpu()

    def stop(self, wall: float) -> dict[str, Any]:
        snap: GroupSnapshot = group_snapshot(*self.workers)
        busy, total = machine_cpu()
        cores = os.cpu_count() or 1
        worker_cpu = snap.cpu_seconds - self.group_cpu
        return {
            "worker_processes": snap.processes,
            "worker_rss_mb": round(snap.rss_kb / 1024, 1),
            "worker_peak_rss_mb": round(snap.hwm_kb / 1024, 1),
            "worker_cpu_s": round(worker_cpu, 2),
            "worker_cpu_util": round(worker_cpu / (wall * cores), 3) if wall else None,
            "other_cpu_s": {
                "benchmark_process": round(time.process_time() - self.own_cpu, 2),
                **{
                    k: round(group_snapshot(g).cpu_seconds - self.others_cpu[k], 2)
                    for k, g in self.others.items()
                },
            },
            "machine_cpu_util": round(
                (busy - self.machine[0]) / max(1e-9, total - self.machine[1]), 3
            ),
        }


def throughput(requests: int, wall: float, messages: int) -> dict[str, Any]:
    return {
        "requests": requests,
        "wall_s": round(wall, 3),
        "req_per_s": round(requests / wall, 2) if wall > 0 else None,
        "messages": messages,
        "msg_per_s": round(messages / wall, 1) if wall > 0 else None,
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def latency_summary(
    samples: dict[str, list[float]], quantiles: Sequence[float] = (0.5, 0.95)
) -> dict[str, dict[str, float]]:
    """Per kind: n, mean, the quantiles asked for (`p50_s`, `p95_s`, ...) and max, in s."""
    return {
        kind: {
            "n": len(v),
            "mean_s": round(statistics.fmean(v), 2),
            **{f"p{round(100 * q)}_s": round(percentile(v, q), 2) for q in quantiles},
            "max_s": round(max(v), 2),
        }
        for kind, v in sorted(samples.items())
        if v
    }


def count_log_events(paths: Iterable[Path], events: Sequence[str]) -> dict[str, int]:
    """How often each of `events` occurs, summed over the log files `paths`."""
    counts: Counter[str] = Counter()
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        counts.update({e: text.count(e) for e in events if e in text})
    return dict(counts)


def worker_logs(log_dir: Path, groups: int) -> list[Path]:
    """The log file of each worker group of a `LocalStack`: worker.log, worker-2.log, ..."""
    return [log_dir / f"{name}.log" for name in group_names("worker", groups)]


# --------------------------------------------------------------------- real run


@dataclass
class RealRun:
    """What the real run hands to the no-op run: the batch and what each request cost."""

    batch: list[BenchRequest]
    warmup: list[BenchRequest]
    plans: dict[str, HopPlan]
    result: dict[str, Any]


class StateProbe:
    """Reads the state database from the benchmark process, without taking write locks."""

    def __init__(self, url: str, prefix: str):
        self.engine = sa.create_engine(url)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine)
        self.like = f"{prefix}-%"

    def states(self) -> Counter[str]:
        with self.sessions() as s:
            rows = s.execute(
                sa.select(RequestRow.state, sa.func.count())
                .where(RequestRow.id.like(self.like))
                .group_by(RequestRow.state)
            ).all()
        return Counter({state: n for state, n in rows})

    def requests(self) -> list[RequestRow]:
        with self.sessions() as s:
            return list(
                s.execute(sa.select(RequestRow).where(RequestRow.id.like(self.like))).scalars()
            )

    def task_counts(self) -> dict[str, Counter[str]]:
        with self.sessions() as s:
            rows = s.execute(
                sa.select(StoreTaskRow.request_id, StoreTaskRow.phase, sa.func.count())
                .where(StoreTaskRow.request_id.like(self.like))
                .group_by(StoreTaskRow.request_id, StoreTaskRow.phase)
            ).all()
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for rid, phase, n in rows:
            counts[rid][phase] = n
        return counts

    def messages(self) -> dict[str, int]:
        """Messages the batch published: intake documents, stage messages, mails."""
        with self.sessions() as s:
            outbox = s.execute(
                sa.select(
                    sa.func.count(), sa.func.coalesce(sa.func.sum(OutboxRow.publish_count), 0)
                ).where(OutboxRow.key.like(self.like))
            ).one()
            mails = s.scalar(
                sa.select(sa.func.count()).where(NotificationRow.request_id.like(self.like))
            )
        return {"stage": int(outbox[0]), "stage_publishes": int(outbox[1]), "mail": int(mails or 0)}

    def batching(self) -> dict[str, dict[str, float]]:
        """How many ids each broker message carried, per actor: the rows one publish
        marked together share their `published_at`, and a publish sends one message per
        actor (up to `outbox.BATCH_MAX` ids). Mails count too: their rows are keyed by
        the notification, not the request."""
        mails = sa.select(sa.literal("mail:") + NotificationRow.id).where(
            NotificationRow.request_id.like(self.like)
        )
        with self.sessions() as s:
            rows = s.execute(
                sa.select(OutboxRow.actor, OutboxRow.published_at, sa.func.count())
                .where(
                    sa.or_(OutboxRow.key.like(self.like), OutboxRow.key.in_(mails)),
                    OutboxRow.published_at.is_not(None),
                )
                .group_by(OutboxRow.actor, OutboxRow.published_at)
            ).all()
        out: dict[str, dict[str, float]] = {}
        for actor in sorted({r[0] for r in rows}):
            sizes = [n for a, _at, n in rows if a == actor]
            messages = sum(-(-n // BATCH_MAX) for n in sizes)
            out[actor] = {
                "ids": sum(sizes),
                "messages": messages,
                "ids_per_message": round(sum(sizes) / messages, 1),
            }
        return out

    def close(self) -> None:
        self.engine.dispose()


@dataclass(frozen=True)
class SinkMail:
    """One mail at the sink that names a request of the batch."""

    request_id: str
    message_id: str
    arrived_at: float  # epoch seconds: the sink names each file by its UTC arrival time


def sink_mails(folder: Path, prefix: str) -> list[SinkMail]:
    """The mails at the sink for requests whose id starts with `prefix`, oldest first."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d+")
    parser = BytesParser(policy=email.policy.default)
    found = []
    for path in sorted(folder.glob("*.eml")):
        message = parser.parsebytes(path.read_bytes())
        assert isinstance(message, EmailMessage)
        body = message.get_body(("plain",))
        match = pattern.search(body.get_content() if body is not None else "")
        if match is None:
            continue
        stamp = datetime.strptime(path.name.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ")
        found.append(
            SinkMail(
                match.group(0), str(message["Message-ID"]), stamp.replace(tzinfo=UTC).timestamp()
            )
        )
    return found


def mail_report(folder: Path, prefix: str) -> dict[str, Any]:
    """Mails per request (one acknowledgement and one outcome expected) and duplicates."""
    mails = sink_mails(folder, prefix)
    per_request = Counter(m.request_id for m in mails)
    ids = Counter(m.message_id for m in mails)
    return {
        "mails": sum(per_request.values()),
        "duplicate_message_ids": sorted(m for m, n in ids.items() if n > 1),
        "requests_without_two_mails": sorted(r for r, n in per_request.items() if n != 2),
    }


def submit_all(app_bus: Any, docs: Sequence[dict[str, Any]]) -> None:
    for doc in docs:
        submit(doc, bus=app_bus)


def mail_count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for entry in entries if entry.name.endswith(".eml"))


def settled(
    probe: StateProbe, folder: Path, total: int, mails_before: int
) -> Callable[[], tuple[bool, str]]:
    """For `wait_until`: all `total` requests final, and each has its mails at the sink
    (an acknowledgement each, and an outcome for each one done).

    The sink's folder is listed only once every request is final, or every few seconds
    for the progress line: listing it on every poll cost the benchmark's own CPU, which
    the workers share on a small machine."""
    status = ""
    next_count = 0.0

    def check() -> tuple[bool, str]:
        nonlocal status, next_count
        states = probe.states()
        final = sum(states[s] for s in FINAL)
        if final < total and time.monotonic() < next_count:
            return False, status
        next_count = time.monotonic() + 2
        sent = mail_count(folder) - mails_before
        status = f"{final}/{total} final, {sent} mails, {dict(states)}"
        return final == total and sent >= sum(states.values()) + states["done"], status

    return check


def warm_up(
    app: App,
    key: bytes,
    url: str,
    warmup: list[BenchRequest],
    prefix: str,
    folder: Path,
    *,
    timeout: float,
    alive: Callable[[], None],
) -> int:
    """The untimed warm-up through a started stack; returns the mails at the sink after it."""
    probe = StateProbe(url, prefix)
    try:
        print(f"-- real: warming up with {len(warmup)} requests", flush=True)
        submit_all(app.bus, [document(r, key) for r in warmup])
        check = settled(probe, folder, len(warmup), 0)
        wait_until(check, timeout=timeout, label="warm-up", alive=alive)
    finally:
        probe.close()
    return mail_count(folder)


@dataclass(frozen=True)
class RunningStack:
    """The real pipeline, started and warmed up: what a timed run submits to and reads."""

    app: App
    key: bytes  # the demo intake key that signs the assertions
    url: str  # the state database
    sink: MailSink
    stack: LocalStack
    warm_mails: int  # mails at the sink after the warm-up


@contextmanager
def running_stack(
    opts: Options,
    folder: Path,
    data_dir: Path,
    namespace: str,
    warmup: list[BenchRequest],
    warm_prefix: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningStack]:
    """A fresh state database, a mail sink, the real worker and scheduler processes on
    their own queue namespace, and the untimed warm-up; all stopped and removed after."""
    with (
        state_database(opts.database, folder, opts.pg_admin_url) as url,
        MailSink(folder / "mail", port=0) as sink,
    ):
        env = {**pipeline_env(opts, data_dir, url, namespace, sink.port), **(extra_env or {})}
        app = App(Settings.from_env(env))
        upgrade(app.engine)
        key = app.keys.intake_keys["allego-app"]  # writes the demo keys before workers start
        stack = LocalStack(
            env=env,
            log_dir=folder / "logs",
            processes=opts.processes,
            threads=opts.threads,
            web=False,
            scheduler=True,
            worker_groups=opts.worker_groups,
        )
        try:
            stack.start()
            warm_mails = warm_up(
                app,
                key,
                url,
                warmup,
                warm_prefix,
                sink.folder,
                timeout=opts.timeout,
                alive=stack.check_alive,
            )
            yield RunningStack(app, key, url, sink, stack, warm_mails)
        finally:
            stack.stop()
            app.broker.close()
            app.close()
            drop_namespace(opts.broker_url, namespace)


def run_real(opts: Options, run_id: str, folder: Path) -> RealRun:
    data_dir = folder / "data"
    people, stores = seed_people(data_dir, opts.requests + len(TYPE_MIX))
    warm_people, batch_people = split_people(people, len(TYPE_MIX))
    prefix = f"bench-{run_id}"
    warmup = warmup_batch(warm_people, f"warm-{run_id}")
    batch = plan_batch(opts.requests, batch_people, prefix=prefix)
    namespace = f"bench-real-{run_id}"
    with running_stack(opts, folder, data_dir, namespace, warmup, f"warm-{run_id}") as real:
        probe = StateProbe(real.url, prefix)
        children = real.stack.children
        window = Window(
            tuple(children[name].pid for name in real.stack.worker_names),
            {"scheduler": children["scheduler"].pid},
        )
        print(f"-- real: submitting {len(batch)} requests", flush=True)
        docs = [document(r, real.key) for r in batch]
        started = time.time()
        submit_all(real.app.bus, docs)
        submitted = time.time() - started
        check = settled(probe, real.sink.folder, len(batch), real.warm_mails)
        wait_until(check, timeout=opts.timeout, label="real", alive=real.stack.check_alive)
        rows = probe.requests()
        done_at = [r.completed_at.timestamp() for r in rows if r.completed_at]
        drained_at = max((f.stat().st_mtime for f in real.sink.folder.glob("*.eml")), default=0)
        wall = max(drained_at, *done_at) - started if done_at else time.time() - started
        result = real_result(opts, rows, batch, probe, wall, submitted, started, done_at)
        result.update(window.stop(wall))
        plans = hop_plans(batch, rows, probe.task_counts(), stores)
        result["real_messages"] = probe.messages()
        probe.close()
    # after the processes stopped: every log line and mail is in its file
    result["mail"] = mail_report(folder / "mail", prefix)
    result["worker_log"] = count_log_events(
        worker_logs(folder / "logs", opts.worker_groups), WORKER_LOG_EVENTS
    )
    result["scheduler_log"] = count_log_events(
        [folder / "logs" / "scheduler.log"], SCHEDULER_LOG_EVENTS
    )
    result.update(throughput(result["requests"], wall, sum(p.messages for p in plans.values())))
    return RealRun(batch, warmup, plans, result)


def real_result(
    opts: Options,
    rows: list[RequestRow],
    batch: list[BenchRequest],
    probe: StateProbe,
    wall: float,
    submitted: float,
    started: float,
    done_at: list[float],
) -> dict[str, Any]:
    states = Counter(r.state for r in rows)
    latencies: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.state == "done" and r.completed_at:
            latencies[r.type].append((r.completed_at - r.received_at).total_seconds())
    result = throughput(states["done"], wall, 0)
    result.update(
        states=dict(states),
        submit_s=round(submitted, 3),
        all_done_s=round(max(done_at) - started, 3) if done_at else None,
        latency=latency_summary(latencies),
        not_done=[
            {"request_id": r.id, "type": r.type, "state": r.state, "reason": r.state_reason}
            for r in rows
            if r.state != "done"
        ],
        missing=sorted({b.request_id for b in batch} - {r.id for r in rows}),
    )
    return result


def hop_plans(
    batch: list[BenchRequest],
    rows: list[RequestRow],
    tasks: dict[str, Counter[str]],
    stores: int,
) -> dict[str, HopPlan]:
    """What each request cost in the real run; the most it could cost where it did not finish."""
    done = {r.id for r in rows if r.state == "done"}
    plans = {}
    for b in batch:
        t = tasks.get(b.request_id)
        if b.request_id in done and t is not None:
            plans[b.request_id] = HopPlan(b.kind, t["locate"], t["act"], t["recheck"])
        else:
            plans[b.request_id] = HopPlan.expected(b.kind, stores)
    return plans


# --------------------------------------------------------------------- no-op run


@contextmanager
def noop_workers(
    opts: Options, env: dict[str, str], log_dir: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """`opts.worker_groups` no-op dramatiq groups (noop, noop-2, ...), each logging to
    `<name>.log` in `log_dir`: the real run's topology."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in group_names("noop", opts.worker_groups):
            with (log_dir / f"{name}.log").open("ab") as out:
                children[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dramatiq",
                        "bench.noop_actors",
                        "--processes",
                        str(opts.processes),
                        "--threads",
                        str(opts.threads),
                    ],
                    env={**os.environ, **env, "PYTHONPATH": path},
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        yield children
    finally:
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def run_noop(opts: Options, run_id: str, folder: Path, real: RealRun) -> dict[str, Any]:
    namespace = f"bench-noop-{run_id}"
    env = pipeline_env(opts, folder, "sqlite://", namespace, 1)
    bus = DramatiqBus(make_broker(Settings.from_env(env)))
    client = redis.Redis.from_url(opts.broker_url)
    key = os.urandom(32)  # the no-op never checks assertions; sign anyway, for equal sizes
    stores = max((p.locate for p in real.plans.values()), default=6)

    def tagged(requests: list[BenchRequest], plans: dict[str, HopPlan]) -> list[dict[str, Any]]:
        return [
            document(r, key, request_id=plans[r.request_id].tag(r.request_id)) for r in requests
        ]

    def finished(count: int) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            done = int(client.get(noop_done_key(namespace)) or 0)
            return done >= count, f"{done}/{count} done"

        return check

    warm_plans = {r.request_id: HopPlan.expected(r.kind, stores) for r in real.warmup}
    try:
        with noop_workers(opts, env, folder / "logs") as children:

            def alive() -> None:
                for name, child in children.items():
                    if child.poll() is not None:
                        log = folder / "logs" / f"{name}.log"
                        tail = log.read_text(errors="replace")[-3000:]
                        raise RuntimeError(
                            f"the no-op workers {name} exited with {child.returncode}:\n{tail}"
                        )

            print(f"-- no-op: warming up with {len(real.warmup)} requests", flush=True)
            submit_all(bus, tagged(real.warmup, warm_plans))
            wait_until(
                finished(len(real.warmup)), timeout=opts.timeout, label="no-op warm-up", alive=alive
            )
            window = Window(tuple(child.pid for child in children.values()))
            docs = tagged(real.batch, real.plans)
            print(f"-- no-op: submitting {len(docs)} requests", flush=True)
            started = time.time()
            submit_all(bus, docs)
            submitted = time.time() - started
            total = len(real.warmup) + len(docs)
            complete = wait_until(finished(total), timeout=opts.timeout, label="no-op", alive=alive)
            last = float(client.get(noop_last_done_key(namespace)) or time.time())
            wall = last - started
            result = throughput(len(docs) if complete else 0, wall, real.result["messages"])
            result["submit_s"] = round(submitted, 3)
            result.update(window.stop(wall))
    finally:
        bus.broker.close()
        client.close()
        drop_namespace(opts.broker_url, namespace)
    return result


# --------------------------------------------------------------------- profile pass


@dataclass
class InlineBus:
    """Runs published messages in this process, in order; times each stage by actor."""

    app: App
    queue: deque[Envelope] = field(default_factory=deque)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: Counter[str] = field(default_factory=Counter)
    retries: int = 0

    def publish(self, envelope: Envelope) -> None:
        self.queue.append(envelope)

    def outstanding(self) -> int:
        return len(self.queue)

    def drain(self) -> None:
        while self.queue:
            envelope = self.queue.popleft()
            began = time.perf_counter()
            try:
                handle(self.app, envelope.actor, *envelope.args)
            except TransientError:
                self.retries += 1
                self.queue.append(envelope)  # retried at once: the delay is not the point here
            finally:
                self.seconds[envelope.actor] += time.perf_counter() - began
                self.calls[envelope.actor] += 1


_SITE = re.compile(r"site-packages/([A-Za-z_]\w*)")
_STDLIB = re.compile(r"lib/python3\.\d+/([A-Za-z_]\w*)")
_BUILTIN = re.compile(r"(sqlite3|psycopg|_ssl|socket|select|_hashlib|zlib|posix|_io|json)")


def package_of(filename: str, func: str) -> str:
    """Which library a profile entry belongs to, for a coarse 'where the time goes'."""
    if filename == "~":
        match = _BUILTIN.search(func)
        return f"builtin:{match.group(1)}" if match else "builtin:other"
    match = _SITE.search(filename) or _STDLIB.search(filename)
    if match:
        return match.group(1)
    if filename.startswith(str(REPO)):
        return Path(filename).relative_to(REPO).parts[0]
    return Path(filename).name


def profile_summary(stats: pstats.Stats, top: int) -> dict[str, Any]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    by_package: defaultdict[str, float] = defaultdict(float)
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        by_package[package_of(filename, func)] += tt

    def top_by(column: int) -> list[dict[str, Any]]:
        rows = sorted(raw.items(), key=lambda kv: kv[1][column], reverse=True)[:top]
        return [
            {
                "function": f"{Path(f).name}:{line}({func})" if f != "~" else func,
                "calls": nc,
                "own_s": round(tt, 3),
                "cumulative_s": round(ct, 3),
            }
            for (f, line, func), (_cc, nc, tt, ct, _callers) in rows
        ]

    return {
        "own_time_by_package": {
            k: {"s": round(v, 3), "share": round(v / total, 3)}
            for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])[:15]
        },
        "top_cumulative": top_by(3),
        "top_own": top_by(2),
    }


def log_to_file(settings: Settings, path: Path) -> None:
    """The stages log as the workers do, but into a file, not over the terminal."""
    from pipeline.logs import configure_logging

    configure_logging(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(path.open("a"))


def run_profile(opts: Options, run_id: str, folder: Path, stamp: str) -> dict[str, Any]:
    data_dir = folder / "data"
    people, _ = seed_people(data_dir, opts.profile_requests)
    batch = plan_batch(opts.profile_requests, people, prefix=f"prof-{run_id}")
    with (
        state_database(opts.database, folder, opts.pg_admin_url) as url,
        MailSink(folder / "mail", port=0) as sink,
    ):
        settings = Settings.from_env(pipeline_env(opts, data_dir, url, "unused", sink.port))
        return profile_pass(settings, batch, folder / "logs", RESULTS / f"profile-{stamp}.prof")


def profile_pass(
    settings: Settings, batch: list[BenchRequest], log_dir: Path, prof_path: Path
) -> dict[str, Any]:
    """Every message of `batch`, in this process and one thread, under cProfile.

    `settings` name a fresh, empty state database; the stores are the ones they configure.
    """
    app = App(replace(settings, batch_window_ms=0))  # inline, in order: no coalescing
    bus = InlineBus(app)
    app.__dict__["bus"] = bus
    upgrade(app.engine)
    log_to_file(settings, log_dir / "profile.log")
    key = app.keys.intake_keys["allego-app"]
    docs = [document(r, key) for r in batch]
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.enable()
    submit_all(bus, docs)
    bus.drain()
    profiler.disable()
    wall = time.perf_counter() - began
    app.close()
    prof_path.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(prof_path)
    out, own = io.StringIO(), io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(25)
    pstats.Stats(profiler, stream=own).sort_stats("tottime").print_stats(25)
    summary = profile_summary(stats, 25)
    return {
        "requests": len(batch),
        "wall_s_under_profiler": round(wall, 2),
        "req_per_s_single_thread_profiled": round(len(batch) / wall, 2),
        "retries": bus.retries,
        "stage_seconds": {
            a: {
                "calls": bus.calls[a],
                "total_s": round(s, 3),
                "mean_ms": round(1000 * s / bus.calls[a], 1),
            }
            for a, s in sorted(bus.seconds.items(), key=lambda kv: -kv[1])
        },
        **summary,
        "pstats_top25": out.getvalue(),
        "pstats_top25_own": own.getvalue(),
        "prof_file": str(
            prof_path.relative_to(REPO) if prof_path.is_relative_to(REPO) else prof_path
        ),
    }


# --------------------------------------------------------------------- report


def worker_topology(options: dict[str, Any]) -> str:
    """A result's worker groups, processes per group and threads per process, as
    `2 groups of 1x4 workers`."""
    groups = options.get("worker_groups", 1)
    return (
        f"{groups} group{'s' if groups != 1 else ''} of "
        f"{options['processes']}x{options['threads']} workers"
    )


def print_report(result: dict[str, Any]) -> None:
    real, noop = result["real"], result["noop"]
    o = result["options"]
    print(
        f"\n== Throughput: {o['requests']} requests, {worker_topology(o)}, "
        f"state DB {o['database']}, {result['machine']['cpus']} CPUs"
    )
    print(f"   {'run':<8} {'req/s':>8} {'msg/s':>8} {'wall s':>8} {'worker CPU':>11} {'RSS MB':>8}")
    for name, r in (("real", real), ("no-op", noop)):
        print(
            f"   {name:<8} {r['req_per_s']!s:>8} {r['msg_per_s']!s:>8} {r['wall_s']:>8.2f} "
            f"{r['worker_cpu_util']!s:>11} {r['worker_rss_mb']:>8}"
        )
    print(f"   ratio real/no-op: {result['ratio']}  (goal >= 0.5)")
    print(f"   real states: {real['states']}; all done after {real['all_done_s']}s")
    print(
        f"   mail: {real['mail']['mails']} mails, "
        f"duplicate Message-IDs: {real['mail']['duplicate_message_ids']}"
    )
    print(f"   worker log events: {real['worker_log']}; scheduler: {real['scheduler_log']}")
    print(
        f"   machine CPU busy: real {real['machine_cpu_util']}, no-op {noop['machine_cpu_util']}; "
        f"other CPU s (real): {real['other_cpu_s']}"
    )
    print(f"\n   {'type':<8} {'n':>4} {'mean s':>8} {'p50 s':>8} {'p95 s':>8} {'max s':>8}")
    for kind, lat in real["latency"].items():
        print(
            f"   {kind:<8} {lat['n']:>4} {lat['mean_s']:>8} {lat['p50_s']:>8} "
            f"{lat['p95_s']:>8} {lat['max_s']:>8}"
        )
    for item in real["not_done"][:20]:
        print(f"   !! not done: {item}")
    profile = result.get("profile")
    if profile:
        print_profile(profile)


def print_profile(profile: dict[str, Any]) -> None:
    print(
        f"\n== Profile: {profile['requests']} requests in one thread, "
        f"{profile['wall_s_under_profiler']}s under cProfile ({profile['prof_file']})"
    )
    for actor, s in profile["stage_seconds"].items():
        print(
            f"   {actor:<16} {s['calls']:>5} calls {s['total_s']:>8.2f}s "
            f"{s['mean_ms']:>8.1f} ms/call"
        )
    print("   own time by package:")
    for pkg, v in profile["own_time_by_package"].items():
        print(f"     {pkg:<24} {v['s']:>8.2f}s {100 * v['share']:>5.1f}%")
    print(profile["pstats_top25"])


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if not redis_answers(opts.broker_url):
        print(f"no Redis answers at {opts.broker_url}", file=sys.stderr)
        return 2
    run_id = uuid.uuid4().hex[:8]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix=f"privacy-bench-{run_id}-"))
    print(f"== privacy pipeline throughput benchmark (work folder {work})", flush=True)
    real = run_real(opts, run_id, work / "real")
    noop = run_noop(opts, run_id, work / "noop", real)
    result: dict[str, Any] = {
        "when": stamp,
        "options": asdict(opts),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "real": real.result,
        "noop": noop,
        "ratio": round(real.result["req_per_s"] / noop["req_per_s"], 3)
        if real.result["req_per_s"] and noop["req_per_s"]
        else None,
    }
    if opts.profile:
        print(f"-- profile: {opts.profile_requests} requests in-process under cProfile", flush=True)
        result["profile"] = run_profile(opts, run_id, work / "profile", stamp)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"throughput-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print_report(result)
    ok = not real.result["not_done"] and not real.result["missing"]
    if opts.keep or not ok:
        print(f"\n   work folder kept (logs, mail): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"   results: {path.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
