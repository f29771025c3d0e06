"""Load generator: the pipeline end to end against one large PostgreSQL product store.

    .venv/bin/python bench/load.py [--users 100000] --mode batch --requests 200 --mix access
    .venv/bin/python bench/load.py --mode rate --rate 2 --duration 60 --mix mixed [--profile]
    .venv/bin/python bench/load.py --mode batch --requests 300 --worker-groups 2 --processes 1
    .venv/bin/python bench/load.py --mode batch --requests 200 --mix access --heavy 1

1. Store: a fresh PostgreSQL database holding the shop of `bench/shop_store.py` (users,
   orders, payment cards, videos, comments, login events: 23 rows per person, every
   foreign key indexed), generated in the database; a mapping TOML and a stores TOML
   naming only that store, which the pipeline reads through `PRIVACY_STORES_CONFIG`.
2. Real run: a fresh state database (PostgreSQL by default), a mail sink, and the real
   worker and scheduler processes (`LocalStack`): `--worker-groups` process groups of
   `--processes` x `--threads` workers each, as that many hosts would run them, sharing
   the broker and the state database. After an untimed warm-up of one
   request of each type, the requests go in as one batch (`--mode batch`) or at a
   fixed arrival rate (`--mode rate`): `--mix access`, `erase` or `mixed` (all five
   types), pre-verified by the signed intake assertion, each aimed at its own user.
   Measured: completed/s over the window from the first submission to the last
   completion or mail, latency per request (received -> completed, and -> the last
   mail at the sink), RSS and CPU per process and per worker group (sampled from
   /proc), PostgreSQL's and
   Redis's CPU; then what the requests did (states, one acknowledgement and one outcome
   mail each and no duplicate, one encrypted archive per access, the store: erased
   people gone, everyone else untouched) and whether any request starved.
3. No-op run (`--no-noop` skips it): `bench.noop_actors` with the same processes,
   threads and broker, replaying the hops each request cost, as a batch: the ratio
   real / no-op completed/s.
4. `--heavy N` (fairness): N users of the first requests (the first, then spread over
   the first 10 %) each own `--heavy-rows` extra rows, so each travels in a group with
   light requests; reported: their latency against the light requests' of the first
   10 % and of the whole run.
5. `--profile`: the in-process cProfile pass of bench/throughput.py over this store.
   `--py-spy`: py-spy samples the real workers' stacks during the real run (py-spy is
   not a dependency: `.venv/bin/pip install py-spy`).

Prints a table, writes bench/results/load-<timestamp>.json and a plot (latency of each
request over its submission time, completed/s, worker RSS and CPU) as load-<timestamp>.png.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `pipeline` importable
    sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from bench import throughput as tp  # noqa: E402
from bench.connector_scale import PG_ADMIN_URL, store_url  # noqa: E402
from bench.procstats import _stat_fields, _status_kb  # noqa: E402
from bench.shop_store import (  # noqa: E402
    Heavy,
    Targets,
    build_store,
    effects,
    fingerprint,
    shopper,
    table_sizes,
    write_config,
)
from bench.workload import TYPE_MIX, BenchRequest, document, type_counts  # noqa: E402
from pipeline import archive  # noqa: E402
from pipeline.bootstrap import App  # noqa: E402
from pipeline.db import ExportRow  # noqa: E402
from pipeline.intake import submit  # noqa: E402
from pipeline.mailsink import MailSink  # noqa: E402
from pipeline.services import redis_answers  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

MIXES: dict[str, dict[str, int]] = {
    "access": {"access": 1},
    "erase": {"erase": 1},
    "mixed": TYPE_MIX,
}
QUANTILES = (0.5, 0.95, 0.99)
SAMPLE_SECONDS = 1.0
STARVED_FACTOR = 2.0  # a request waiting more than this many times the p99 is starved
FIRST_SHARE = 0.1  # the heavy requests go among this share of the first arrivals
GROUP_WORK_EVENTS = ("request_accepted", "store_task_completed")  # who did what, per group


@dataclass(frozen=True)
class LoadOptions:
    users: int = 100_000
    mode: str = "batch"  # batch | rate
    requests: int = 200  # batch size
    rate: float = 2.0  # requests per second, --mode rate
    duration: float = 60.0  # seconds of arrivals, --mode rate
    mix: str = "mixed"
    heavy: int = 0  # people with --heavy-rows extra rows each, among the first requests
    heavy_rows: int = 100_000
    processes: int = 2  # per worker group
    threads: int = 4
    worker_groups: int = 1  # as on that many hosts, sharing the broker and the state DB
    database: str = "postgresql"
    noop: bool = True
    profile: bool = False
    profile_requests: int = 50
    py_spy: bool = False
    py_spy_gil: bool = False  # sample only the thread holding the GIL: where Python runs
    py_spy_idle: bool = False  # sample waiting threads too: where the workers wait
    timeout: float = 1800
    seed: int = 7
    broker_url: str = Settings.broker_url
    pg_admin_url: str = PG_ADMIN_URL
    results_dir: Path = tp.RESULTS
    plot: bool = True
    keep: bool = False

    @property
    def total(self) -> int:
        return self.requests if self.mode == "batch" else round(self.rate * self.duration)

    def throughput_options(self) -> tp.Options:
        """The same run as bench/throughput.py sees it (its no-op run and helpers)."""
        return tp.Options(
            self.total,
            self.processes,
            self.threads,
            self.database,
            self.profile,
            self.profile_requests,
            self.timeout,
            self.broker_url,
            self.pg_admin_url,
            self.keep,
            worker_groups=self.worker_groups,
        )


def parse_args(argv: Sequence[str] | None = None) -> LoadOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=100_000, help="people in the store (100,000)")
    p.add_argument("--mode", choices=("batch", "rate"), default="batch")
    p.add_argument("--requests", type=int, default=200, help="batch size (--mode batch)")
    p.add_argument("--rate", type=float, default=2.0, help="arrivals per second (--mode rate)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (rate)")
    p.add_argument("--mix", choices=tuple(MIXES), default="mixed")
    p.add_argument(
        "--heavy",
        type=int,
        default=0,
        help="people with --heavy-rows extra rows each, among the first requests (0)",
    )
    p.add_argument(
        "--heavy-rows", type=int, default=100_000, help="extra rows per heavy person (100,000)"
    )
    p.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    p.add_argument(
        "--worker-groups",
        type=int,
        default=1,
        help="worker process groups, as on that many hosts, each of --processes (default 1)",
    )
    p.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    p.add_argument("--no-noop", dest="noop", action="store_false", help="skip the no-op run")
    p.add_argument("--profile", action="store_true", help="add the in-process cProfile pass")
    p.add_argument("--profile-requests", type=int, default=50)
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the real workers' stacks with py-spy during the run (pip install py-spy)",
    )
    p.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="with --py-spy: sample only the thread holding the GIL in each process",
    )
    p.add_argument(
        "--py-spy-idle",
        action="store_true",
        help="with --py-spy: sample waiting threads too (where the workers wait)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the run")
    p.add_argument("--seed", type=int, default=7, help="who gets which request")
    p.add_argument(
        "--broker-url", default=os.environ.get("PRIVACY_BROKER_URL", Settings.broker_url)
    )
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the databases")
    p.add_argument("--results-dir", type=Path, default=tp.RESULTS, help="bench/results")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--keep", action="store_true", help="keep the store database and work folder")
    a = vars(p.parse_args(argv))
    if a["worker_groups"] < 1:
        p.error(f"--worker-groups {a['worker_groups']}: run 1 or more worker groups")
    opts = LoadOptions(**a)
    if not 0 <= opts.heavy <= opts.total:
        p.error(f"--heavy {opts.heavy}: between 0 and the {opts.total} requests of the run")
    if opts.heavy_rows < 0:
        p.error(f"--heavy-rows {opts.heavy_rows}: 0 or more")
    return opts


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """Who gets which request: every request of the run aims at a user of its own."""

    warmup: list[BenchRequest]
    batch: list[BenchRequest]
    profile: list[BenchRequest]
    user_of: dict[str, int]  # email -> user id in the store
    heavy: Heavy = Heavy()  # the store's heavy people: the users of `heavy_requests`
    heavy_requests: tuple[str, ...] = ()

    def targets(self) -> Targets:
        """The users whose store rows the real run (warm-up and batch) changes."""
        by_kind: dict[str, set[int]] = defaultdict(set)
        for r in (*self.warmup, *self.batch):
            by_kind[r.kind].add(self.user_of[r.person.email])
        return Targets(
            frozenset(by_kind["erase"]),
            frozenset(by_kind["correct"]),
            frozenset(by_kind["opt_out"]),
        )


def first_arrivals(total: int) -> int:
    """How many requests make the first 10 % of the run (at least one)."""
    return max(1, math.ceil(total * FIRST_SHARE))


def heavy_positions(total: int, heavy: int) -> list[int]:
    """Where the heavy requests go: the first, the others evenly over the first 10 %
    (further only if they outnumber it), so each one is batched with light requests."""
    span = max(heavy, first_arrivals(total))
    return [i * span // heavy for i in range(heavy)]


def plan(opts: LoadOptions, run_id: str) -> Plan:
    kinds = [k for k, n in type_counts(opts.total, MIXES[opts.mix]).items() for _ in range(n)]
    profile_kinds = [k for k, n in type_counts(opts.profile_requests).items() for _ in range(n)]
    rng = random.Random(opts.seed)
    rng.shuffle(kinds)
    rng.shuffle(profile_kinds)
    needed = len(TYPE_MIX) + len(kinds) + (len(profile_kinds) if opts.profile else 0)
    if needed > opts.users:
        raise SystemExit(f"{needed} requests need as many users; the store has {opts.users}")
    users = rng.sample(range(1, opts.users + 1), needed)
    people = [shopper(g) for g in users]
    warm, rest = people[: len(TYPE_MIX)], people[len(TYPE_MIX) :]
    batch = [
        BenchRequest(f"load-{run_id}-{i:05d}", k, p)
        for i, (k, p) in enumerate(zip(kinds, rest, strict=False))
    ]
    user_of = {p.email: g for p, g in zip(people, users, strict=True)}
    # the requests stay as they are: only their people grow heavy, so --heavy 0 is the
    # same run and a heavy request has the type the mix gives its position
    heavy = [batch[i] for i in heavy_positions(len(batch), opts.heavy)] if opts.heavy else []
    return Plan(
        warmup=tp.warmup_batch(warm, f"warm-{run_id}"),
        batch=batch,
        profile=[
            BenchRequest(f"prof-{run_id}-{i:05d}", k, p)
            for i, (k, p) in enumerate(zip(profile_kinds, rest[len(kinds) :], strict=False))
        ]
        if opts.profile
        else [],
        user_of=user_of,
        heavy=Heavy(tuple(user_of[r.person.email] for r in heavy), opts.heavy_rows),
        heavy_requests=tuple(r.request_id for r in heavy),
    )


# --------------------------------------------------------------------------- processes


def _cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    return (
        None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    )


def _group_pids(pgids: Iterable[int]) -> dict[int, list[int]]:
    """The processes of each of these process groups, from one pass over /proc (a pass
    per group per sample cost the benchmark's own CPU, which the workers share)."""
    found: dict[int, list[int]] = {pgid: [] for pgid in pgids}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) in found:
                found[int(fields[2])].append(int(entry.name))
    return {pgid: sorted(pids) for pgid, pids in found.items()}


def _pids_named(names: tuple[str, ...]) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                found[int(entry.name)] = comm
    return found


def is_worker(role: str) -> bool:
    """A worker group's name, as LocalStack gives them: `worker`, `worker-2`, ..."""
    return role == "worker" or role.startswith("worker-")


@dataclass
class ProcessSampler:
    """Samples RSS and CPU of each process of the pipeline's groups while the load runs.

    Per process: CPU seconds used in the window, resident memory now and at its peak
    (VmHWM). Per worker group, and over time for every worker group together (for the
    plot): summed RSS and CPU. PostgreSQL and Redis: CPU of every process of that name
    on the machine (so anything else they serve at the time counts too).
    """

    groups: dict[str, int]  # role (`worker`, `worker-2`, ..., `scheduler`) -> pgid
    started: float = field(default_factory=time.time)
    series: list[tuple[float, float, float]] = field(default_factory=list)  # t, MB, CPU s
    _first_cpu: dict[int, float] = field(default_factory=dict)
    _last: dict[int, dict[str, Any]] = field(default_factory=dict)
    _services: dict[int, tuple[str, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcessSampler:
        self._services = self._service_cpu()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    @staticmethod
    def _service_cpu() -> dict[int, tuple[str, float]]:
        return {
            pid: (name, cpu)
            for pid, name in _pids_named(("postgres", "redis-server")).items()
            if (cpu := _cpu_seconds(pid)) is not None
        }

    def sample(self) -> None:
        rss_kb = 0
        cpu = 0.0
        members = _group_pids(self.groups.values())
        for role, pgid in self.groups.items():
            for pid in members[pgid]:
                seconds = _cpu_seconds(pid)
                if seconds is None:
                    continue
                self._first_cpu.setdefault(pid, seconds)
                rss = _status_kb(pid, "VmRSS")
                self._last[pid] = {
                    "role": role if pid != pgid else f"{role} (main)",
                    "group": role,
                    "pid": pid,
                    "rss_mb": round(rss / 1024, 1),
                    "peak_rss_mb": round(_status_kb(pid, "VmHWM") / 1024, 1),
                    "cpu_s": round(seconds - self._first_cpu[pid], 2),
                }
                if is_worker(role):
                    rss_kb += rss
                    cpu += seconds - self._first_cpu[pid]
        self.series.append((time.time() - self.started, rss_kb / 1024, cpu))

    def stop(self, wall: float) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        processes = sorted(self._last.values(), key=lambda p: (p["role"], p["pid"]))
        for p in processes:
            p["cpu_util"] = round(p["cpu_s"] / wall, 3) if wall else None
        workers = [p for p in processes if is_worker(p["group"])]
        services: dict[str, float] = defaultdict(float)
        for pid, (name, cpu) in self._service_cpu().items():
            services[name] += cpu - self._services.get(pid, (name, 0.0))[1]
        cores = os.cpu_count() or 1
        groups: dict[str, dict[str, Any]] = {}
        for name in filter(is_worker, self.groups):
            mine = [p for p in workers if p["group"] == name]
            cpu = sum(p["cpu_s"] for p in mine)
            groups[name] = {
                "processes": len(mine),
                "cpu_s": round(cpu, 2),
                "cpu_util": round(cpu / (wall * cores), 3) if wall else None,  # of the machine
                "peak_rss_mb": round(sum(p["peak_rss_mb"] for p in mine), 1),
            }
        return {
            "processes": processes,
            "worker_groups": groups,
            "worker_rss_mb_sum_peak": round(max((mb for _, mb, _ in self.series), default=0), 1),
            "worker_rss_mb_sum_of_peaks": round(sum(p["peak_rss_mb"] for p in workers), 1),
            "service_cpu_s": {k: round(v, 2) for k, v in sorted(services.items())},
            "series": [
                {"t": round(t, 1), "worker_rss_mb": round(mb, 1), "worker_cpu_s": round(c, 2)}
                for t, mb, c in self.series
            ],
        }


def py_spy_binary() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).is_file() else None


@dataclass
class PySpy:
    """py-spy sampling the worker processes' on-CPU stacks while the load runs: one
    py-spy per worker group (it follows one process tree), their stacks merged into one
    file at the end.

    Unlike the cProfile pass, this is the real thing: several processes and threads,
    the real broker and mail server, and no profiler overhead in the workers (py-spy
    reads their memory from outside, without pausing them).
    """

    pids: dict[str, int]  # worker group -> its main process
    out: Path
    gil: bool = False  # only the thread holding the GIL (py-spy --gil)
    idle: bool = False  # waiting threads too, each stack under its thread (--idle --threads)
    rate: int = 50  # samples per second
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _part(self, name: str, suffix: str) -> Path:
        return self.out.with_name(f"{self.out.stem}-{name}{suffix}")

    def command(self, binary: str, pid: int, output: Path) -> list[str]:
        """py-spy's command line for one worker group's main process."""
        return (
            [binary, "record", "--pid", str(pid), "--subprocesses", "--nonblocking"]
            + (["--gil"] if self.gil else [])
            + (["--idle", "--threads"] if self.idle else [])
            + ["--format", "raw", "--nolineno", "--rate", str(self.rate), "--output", str(output)]
        )

    def start(self) -> PySpy:
        binary = py_spy_binary()
        if binary is None:
            raise RuntimeError(
                "--py-spy: no py-spy found; install it: .venv/bin/pip install py-spy"
            )
        for name, pid in self.pids.items():
            with self._part(name, ".log").open("wb") as log:
                self._procs[name] = subprocess.Popen(
                    self.command(binary, pid, self._part(name, self.out.suffix)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # a background job ignores SIGINT, and so would its children: py-spy
                    # stops on it
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                )
        return self

    def stop(self) -> dict[str, Any]:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        parts = [self._part(name, self.out.suffix) for name in self.pids]
        found = [part for part in parts if part.is_file()]
        if not found:
            logs = (self._part(name, ".log") for name in self.pids)
            return {"error": "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)}
        with self.out.open("w") as merged:  # collapsed stacks: lines add up
            for part in found:
                merged.write(part.read_text(errors="replace"))
        summary = stacks_summary(self.out)
        if len(found) < len(parts):
            summary["missing_groups"] = [p.name for p in parts if p not in found]
        return summary


def stacks_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """Top functions by own and by cumulative samples, and own samples per package, from
    py-spy's collapsed stacks (`frame;frame;... count`, frames as `function (module/file.py)`)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not count.isdigit() or not frames:
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            cumulative[frame] += n
        module = frames[-1].rpartition("(")[2].rstrip(")")
        packages[module.split("/", 1)[0].removesuffix(".py") or "?"] += n

    def rows(counter: Counter[str], limit: int) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": n, "share": round(n / total, 3)}
            for f, n in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "file": str(path),
        "own_by_package": rows(packages, 15),
        "top_own": rows(own, top),
        "top_cumulative": rows(cumulative, top),
    }


# --------------------------------------------------------------------------- real run


def submit_paced(
    app: App, key: bytes, batch: list[BenchRequest], rate: float | None, probe: tp.StateProbe
) -> dict[str, float]:
    """Submits each request when it is due (all at once without a rate); when each went."""
    submitted: dict[str, float] = {}
    started = time.time()
    next_print = started + 10
    for i, request in enumerate(batch):
        if rate:
            delay = started + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        submitted[request.request_id] = time.time()
        submit(document(request, key), bus=app.bus)
        if time.time() >= next_print:
            print(f"   submitted {i + 1}/{len(batch)}: {dict(probe.states())}", flush=True)
            next_print += 10
    return submitted


def exports_report(app: App, url: str, access_ids: set[str]) -> dict[str, Any]:
    """One export row and one encrypted archive per access request, nothing else."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = Counter(
                rid
                for (rid,) in conn.execute(
                    sa.select(ExportRow.request_id).where(ExportRow.request_id.in_(access_ids))
                )
            )
    finally:
        engine.dispose()
    exports = app.settings.exports_dir
    missing, plain = [], []
    for rid in sorted(access_ids):
        archive_file = archive.archive_path(exports, rid)
        if not archive_file.is_file():
            missing.append(rid)
        elif archive_file.open("rb").read(2) == b"PK":
            plain.append(rid)
    expected = {archive.archive_path(exports, rid) for rid in access_ids}
    # anything else is left over: a part never assembled, a staging file
    extra = sorted(
        str(p.relative_to(exports))
        for p in exports.rglob("*")
        if p not in expected and (p.is_file() or p.name == "parts")
    )
    return {
        "access_requests": len(access_ids),
        "export_rows": sum(rows.values()),
        "duplicate_export_rows": sorted(r for r, n in rows.items() if n > 1),
        "without_archive": missing,
        "extra_files": extra,
        "unencrypted": plain,
    }


def overtaken(order: list[tuple[float, float]]) -> list[int]:
    """For (submitted, finished) pairs in submission order: how many requests submitted
    later finished before each one (0 everywhere is first come, first served)."""
    later: list[float] = []
    counts = []
    for _, finished in reversed(order):
        counts.append(bisect.bisect_left(later, finished))
        bisect.insort(later, finished)
    return counts[::-1]


def per_request(
    rows: list[Any], submitted: dict[str, float], mails: list[tp.SinkMail]
) -> list[dict[str, Any]]:
    last_mail: dict[str, float] = {}
    for m in mails:
        last_mail[m.request_id] = max(m.arrived_at, last_mail.get(m.request_id, 0.0))
    first = min(submitted.values())
    out = []
    for r in sorted(rows, key=lambda r: submitted.get(r.id, 0.0)):
        received = r.received_at.timestamp()
        completed = r.completed_at.timestamp() if r.completed_at else None
        mail = last_mail.get(r.id)
        out.append(
            {
                "request_id": r.id,
                "type": r.type,
                "state": r.state,
                "submitted_s": round(submitted.get(r.id, received) - first, 3),
                "done_s": round(completed - received, 3) if completed else None,
                "mail_s": round(mail - received, 3) if mail else None,
                "finished_s": round(max(completed or 0, mail or 0) - first, 3),
            }
        )
    return out


def starvation(requests: list[dict[str, Any]], span: float) -> dict[str, Any]:
    """Did any request wait much longer than the rest (or than the run)?"""
    waits = [r["mail_s"] for r in requests if r["mail_s"] is not None]
    if not waits:
        return {}
    p99 = tp.percentile(waits, 0.99)
    counts = overtaken([(r["submitted_s"], r["finished_s"]) for r in requests])
    starved = [
        r["request_id"] for r in requests if r["mail_s"] and r["mail_s"] > STARVED_FACTOR * p99
    ]
    arrivals = [r["submitted_s"] for r in requests]
    trend = (  # paced arrivals only: does the wait grow as they keep coming?
        statistics.linear_regression(arrivals, [r["mail_s"] or 0 for r in requests])
        if len(requests) > 2 and max(arrivals) - min(arrivals) >= 1
        else None
    )
    return {
        "max_s": round(max(waits), 2),
        "p99_s": round(p99, 2),
        "max_over_p99": round(max(waits) / p99, 2) if p99 else None,
        "p50_over_span": round(tp.percentile(waits, 0.5) / span, 2) if span else None,
        "starved_factor": STARVED_FACTOR,
        "starved": starved,
        "unfinished": [r["request_id"] for r in requests if r["mail_s"] is None],
        "overtaken_max": max(counts),
        "overtaken_mean": round(statistics.fmean(counts), 1),
        "latency_slope_s_per_s": round(trend.slope, 3) if trend else None,
    }


def latency(requests: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if r[key] is not None:
            samples[r["type"]].append(r[key])
            samples["all"].append(r[key])
    return tp.latency_summary(samples, QUANTILES)


def latency_of(requests: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Latency to completion (`done`) and to the last mail (`mail`) of these requests."""
    return tp.latency_summary(
        {
            "done": [r["done_s"] for r in requests if r["done_s"] is not None],
            "mail": [r["mail_s"] for r in requests if r["mail_s"] is not None],
        },
        (0.5, 0.95),
    )


def heavy_report(requests: list[dict[str, Any]], the_plan: Plan) -> dict[str, Any]:
    """Do the heavy people's requests hold back the light ones batched with them?

    Light requests among the first 10 % of arrivals shared the pipeline's batches with
    the heavy ones; all light requests are the yardstick.
    """
    heavy_ids = set(the_plan.heavy_requests)
    position = {r.request_id: i for i, r in enumerate(the_plan.batch)}
    first = first_arrivals(len(the_plan.batch))
    light = [r for r in requests if r["request_id"] not in heavy_ids]
    return {
        "people": len(the_plan.heavy.users),
        "rows_each": the_plan.heavy.per_person(),
        "requests": [
            {"position": position[r["request_id"]], **r}
            for r in requests
            if r["request_id"] in heavy_ids
        ],
        "first_arrivals": first,
        "light_first": latency_of([r for r in light if position[r["request_id"]] < first]),
        "light_all": latency_of(light),
    }


def run_real(
    opts: LoadOptions, run_id: str, folder: Path, store: Path, the_plan: Plan
) -> tp.RealRun:
    prefix = f"load-{run_id}"
    batch = the_plan.batch
    with tp.running_stack(
        opts.throughput_options(),
        folder,
        folder / "data",
        f"load-real-{run_id}",
        the_plan.warmup,
        f"warm-{run_id}",
        {"PRIVACY_STORES_CONFIG": str(store)},
    ) as real:
        probe = tp.StateProbe(real.url, prefix)
        workers = {name: real.stack.children[name].pid for name in real.stack.worker_names}
        scheduler = real.stack.children["scheduler"].pid
        window = tp.Window(tuple(workers.values()), {"scheduler": scheduler})
        sampler = ProcessSampler({**workers, "scheduler": scheduler}).start()
        spy = (
            PySpy(
                workers, folder / "py-spy.txt", gil=opts.py_spy_gil, idle=opts.py_spy_idle
            ).start()
            if opts.py_spy
            else None
        )
        how = f"at {opts.rate}/s for {opts.duration:g} s" if opts.mode == "rate" else "at once"
        print(f"-- real: submitting {len(batch)} {opts.mix} requests {how}", flush=True)
        rate = opts.rate if opts.mode == "rate" else None
        submitted = submit_paced(real.app, real.key, batch, rate, probe)
        check = tp.settled(probe, real.sink.folder, len(batch), real.warm_mails)
        tp.wait_until(check, timeout=opts.timeout, label="load", alive=real.stack.check_alive)
        rows = probe.requests()
        requests = per_request(rows, submitted, tp.sink_mails(real.sink.folder, prefix))
        first = min(submitted.values())
        wall = max((r["finished_s"] for r in requests), default=time.time() - first)
        processes = sampler.stop(wall)
        stacks = spy.stop() if spy else None
        usage = window.stop(wall)
        access = {r.request_id for r in (*the_plan.warmup, *batch) if r.kind == "access"}
        exports = exports_report(real.app, real.url, access)
        plans = tp.hop_plans(batch, rows, probe.task_counts(), stores=1)
        messages = probe.messages()
        batching = probe.batching()
        probe.close()
    # after the processes stopped: every log line and mail is in its file
    states = Counter(r.state for r in rows)
    result: dict[str, Any] = {
        "requests": len(batch),
        "completed": states["done"],
        "wall_s": round(wall, 3),
        "completed_per_s": round(states["done"] / wall, 2) if wall else None,
        "first_submit_at": datetime.fromtimestamp(first, UTC).isoformat(),
        "submission_s": round(max(submitted.values()) - first, 3),
        "offered_per_s": round(len(batch) / (max(submitted.values()) - first), 2)
        if rate and len(batch) > 1
        else None,
        "states": dict(states),
        "missing": sorted({b.request_id for b in batch} - {r.id for r in rows}),
        "not_done": [
            {"request_id": r.id, "type": r.type, "state": r.state, "reason": r.state_reason}
            for r in rows
            if r.state != "done"
        ],
        "latency_done": latency(requests, "done_s"),
        "latency_mail": latency(requests, "mail_s"),
        "starvation": starvation(requests, wall),
        **usage,
        **processes,
        "mail": tp.mail_report(folder / "mail", prefix),
        "exports": exports,
        "worker_log": tp.count_log_events(
            tp.worker_logs(folder / "logs", opts.worker_groups), tp.WORKER_LOG_EVENTS
        ),
        "scheduler_log": tp.count_log_events(
            [folder / "logs" / "scheduler.log"], tp.SCHEDULER_LOG_EVENTS
        ),
        "messages": sum(p.messages for p in plans.values()),
        "real_messages": messages,
        "batching": batching,
        "per_request": requests,
    }
    for name, group in result["worker_groups"].items():
        group["log"] = tp.count_log_events([folder / "logs" / f"{name}.log"], GROUP_WORK_EVENTS)
    if stacks is not None:
        result["py_spy"] = stacks
    return tp.RealRun(batch, the_plan.warmup, plans, result)


def run_profile(
    opts: LoadOptions, run_id: str, folder: Path, store: Path, the_plan: Plan, stamp: str
) -> dict[str, Any]:
    """bench/throughput.py's cProfile pass, over the shop store, on other users."""
    with (
        tp.state_database(opts.database, folder, opts.pg_admin_url) as url,
        MailSink(folder / "mail", port=0) as sink,
    ):
        env = tp.pipeline_env(opts.throughput_options(), folder / "data", url, "unused", sink.port)
        env["PRIVACY_STORES_CONFIG"] = str(store)
        return tp.profile_pass(
            Settings.from_env(env),
            the_plan.profile,
            folder / "logs",
            opts.results_dir / f"load-profile-{stamp}.prof",
        )


# --------------------------------------------------------------------------- run


def problems(result: dict[str, Any]) -> list[str]:
    """What went wrong, in plain words: empty when every request did exactly its job."""
    real = result["real"]
    found = []
    if real["missing"] or real["not_done"]:
        found.append(f"not done: {len(real['missing'])} missing, {len(real['not_done'])} not done")
    mail = real["mail"]
    if mail["duplicate_message_ids"] or mail["requests_without_two_mails"]:
        found.append(
            f"mail: {len(mail['duplicate_message_ids'])} duplicate Message-IDs, "
            f"{len(mail['requests_without_two_mails'])} requests without exactly two mails"
        )
    ex = real["exports"]
    if (
        ex["export_rows"] != ex["access_requests"]
        or ex["duplicate_export_rows"]
        or ex["without_archive"]
        or ex["extra_files"]
        or ex["unencrypted"]
    ):
        found.append(f"exports: {ex}")
    if not result["store"]["effects"]["ok"]:
        found.append(f"store effects: {result['store']['effects']}")
    return found


def cpu_probe() -> float:
    """CPU seconds for a fixed Python loop, the best of three: how fast this host runs
    Python right now. Its speed varies by hour (a shared host), so figures of runs whose
    probes differ much are not comparable."""

    def once() -> float:
        began, total = time.process_time(), 0
        for i in range(2_000_000):
            total += i * i
        return time.process_time() - began

    return round(min(once() for _ in range(3)), 3)


def statement_probe(url: str) -> float:
    """Milliseconds per `SELECT 1` through SQLAlchemy and psycopg to PostgreSQL, the best
    of three runs of 300: the per-statement cost that every stage pays many times. It
    moves with the host's hour much more than `cpu_probe`, whose loop stays in the CPU's
    cache."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            best = float("inf")
            for _ in range(3):
                began = time.perf_counter()
                for _ in range(300):
                    conn.execute(sa.text("SELECT 1")).scalar()
                best = min(best, time.perf_counter() - began)
    finally:
        engine.dispose()
    return round(best / 300 * 1000, 3)


def run(opts: LoadOptions) -> dict[str, Any]:
    """One whole load run; returns the result (also written as JSON and a plot)."""
    run_id = uuid.uuid4().hex[:8]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix=f"privacy-load-{run_id}-"))
    print(f"== privacy pipeline load run (work folder {work})", flush=True)
    the_plan = plan(opts, run_id)
    sizes = table_sizes(opts.users, the_plan.heavy)
    result: dict[str, Any] = {
        "when": stamp,
        "options": {**asdict(opts), "results_dir": str(opts.results_dir), "total": opts.total},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": os.getloadavg(),
            "cpu_probe_s": cpu_probe(),
            "statement_probe_ms": statement_probe(opts.pg_admin_url),
        },
    }
    with store_url("postgresql", opts.pg_admin_url, work, opts.keep) as store_db:
        print(f"-- store: {opts.users:,} users, {sum(sizes.values()):,} rows", flush=True)
        began = time.perf_counter()
        steps = build_store(store_db, opts.users, the_plan.heavy)
        result["store"] = {
            "rows": sizes,
            "heavy_rows": the_plan.heavy.extra_rows(),
            "build_s": round(time.perf_counter() - began, 1),
            "build_steps_s": steps,
        }
        stores = write_config(work / "config", store_db)
        targets = the_plan.targets()
        before = fingerprint(store_db, targets)
        real = run_real(opts, run_id, work / "real", stores, the_plan)
        result["real"] = real.result
        if the_plan.heavy_requests:
            result["heavy"] = heavy_report(real.result["per_request"], the_plan)
        result["store"]["effects"] = effects(store_db, targets, before, the_plan.heavy)
        result["machine"]["load_average_after"] = os.getloadavg()
        if opts.noop:
            result["noop"] = tp.run_noop(opts.throughput_options(), run_id, work / "noop", real)
            noop_rate = result["noop"]["req_per_s"]
            real_rate = real.result["completed_per_s"]
            result["ratio"] = round(real_rate / noop_rate, 4) if real_rate and noop_rate else None
        if opts.profile:
            print(f"-- profile: {len(the_plan.profile)} requests in-process under cProfile")
            result["profile"] = run_profile(opts, run_id, work / "profile", stores, the_plan, stamp)
    result["problems"] = problems(result)
    result["ok"] = not result["problems"]
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stacks = result["real"].get("py_spy", {})
    if stacks.get("file"):
        kept = opts.results_dir / f"load-{stamp}-py-spy.txt"
        shutil.copyfile(stacks["file"], kept)
        stacks["file"] = str(kept)
    path = opts.results_dir / f"load-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    result["json_file"] = str(path)
    if opts.plot:
        result["plot_file"] = str(plot(result, opts.results_dir / f"load-{stamp}.png"))
    if opts.keep or not result["ok"]:
        print(f"   work folder kept (logs, mail, exports): {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- report


def plot(result: dict[str, Any], path: Path) -> Path:
    """Latency of each request over its submission time; completed/s; worker RSS and CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = result["real"]
    requests = real["per_request"]
    fig, (lat, rate, mem) = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    for kind in sorted({r["type"] for r in requests}):
        mine = [r for r in requests if r["type"] == kind and r["mail_s"] is not None]
        lat.scatter([r["submitted_s"] for r in mine], [r["mail_s"] for r in mine], s=10, label=kind)
    heavy = [r for r in result.get("heavy", {}).get("requests", []) if r["mail_s"] is not None]
    if heavy:
        lat.scatter(
            [r["submitted_s"] for r in heavy],
            [r["mail_s"] for r in heavy],
            s=60,
            marker="x",
            color="black",
            label="heavy person",
        )
    lat.set_ylabel("latency to the outcome mail (s)")
    lat.set_title(title(result), fontsize=10)
    lat.legend(loc="upper right", fontsize=8)  # the first arrivals (and heavy people) are left
    lat.grid(alpha=0.3)

    end = int(max((r["finished_s"] for r in requests), default=0)) + 1
    done = Counter(int(r["finished_s"]) for r in requests if r["state"] == "done")
    arrived = Counter(int(r["submitted_s"]) for r in requests)
    seconds = list(range(end))
    rate.bar(
        seconds,
        [done[s] for s in seconds],
        width=1.0,
        align="edge",
        alpha=0.35,
        label="completed in 1 s",
    )
    window = 10
    smooth = [sum(done[s - i] for i in range(window)) / window for s in seconds]
    rate.plot([s + 1 for s in seconds], smooth, label=f"completed/s (mean of {window} s)")
    if result["options"]["mode"] == "rate":  # a batch is one spike at 0
        rate.step(seconds, [arrived[s] for s in seconds], where="post", lw=0.8, label="submitted/s")
    rate.set_ylabel("requests per second")
    rate.legend(loc="upper left", fontsize=8)
    rate.grid(alpha=0.3)

    series = real["series"]
    mem.plot([p["t"] for p in series], [p["worker_rss_mb"] for p in series], label="worker RSS MB")
    mem.set_ylabel("worker RSS (MB, all processes)")
    cpu = mem.twinx()
    cores = [
        (b["worker_cpu_s"] - a["worker_cpu_s"]) / max(1e-9, b["t"] - a["t"])
        for a, b in zip(series, series[1:], strict=False)
    ]
    cpu.plot([p["t"] for p in series[1:]], cores, color="tab:red", lw=0.8, label="worker CPU")
    cpu.set_ylabel("worker CPU (cores)")
    mem.set_xlabel("seconds since the first submission")
    mem.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def title(result: dict[str, Any]) -> str:
    o, real = result["options"], result["real"]
    how = (
        f"batch of {o['total']}"
        if o["mode"] == "batch"
        else f"{o['rate']}/s for {o['duration']:g} s"
    )
    return (
        f"{o['mix']} {how}, {o['users']:,} users, {tp.worker_topology(o)}, "
        f"state DB {o['database']}: {real['completed_per_s']} completed/s"
        + (f", no-op {result['noop']['req_per_s']}/s" if result.get("noop") else "")
    )


def print_report(result: dict[str, Any]) -> None:
    real, store = result["real"], result["store"]
    print(f"\n== Load: {title(result)}")
    heavy_rows = sum(store.get("heavy_rows", {}).values())
    print(
        f"   store: {sum(store['rows'].values()):,} rows"
        + (f" ({heavy_rows:,} of them the heavy people's)" if heavy_rows else "")
        + f", built in {store['build_s']} s {store['build_steps_s']}"
    )
    print(
        f"   completed {real['completed']}/{real['requests']} in {real['wall_s']} s: "
        f"{real['completed_per_s']} completed/s"
        + (f" (offered {real['offered_per_s']}/s)" if real["offered_per_s"] else "")
        + f"; submitting took {real['submission_s']} s"
    )
    noop = result.get("noop")
    if noop:
        paced = " (the real run was paced: not its capacity)" if real["offered_per_s"] else ""
        print(
            f"   no-op run of the same topology: {noop['req_per_s']} req/s, "
            f"wall {noop['wall_s']} s, worker RSS {noop['worker_rss_mb']} MB: "
            f"ratio real/no-op {result['ratio']}{paced}"
        )
    columns = " ".join(f"{c:>7}" for c in ("p50", "p95", "p99", "max"))
    print(f"\n   {'type':<8} {'n':>5}  received -> completed (s)            -> last mail (s)")
    print(f"   {'':<14} {columns}   {columns}")
    for kind, d in real["latency_done"].items():
        m = real["latency_mail"].get(kind, {})
        done = " ".join(f"{d[k]:>7}" for k in ("p50_s", "p95_s", "p99_s", "max_s"))
        mail = " ".join(f"{m.get(k, '-'):>7}" for k in ("p50_s", "p95_s", "p99_s", "max_s"))
        print(f"   {kind:<8} {d['n']:>5} {done}   {mail}")
    if result.get("heavy"):
        print_heavy(result["heavy"])
    print(
        f"\n   {'process':<20} {'pid':>7} {'RSS MB':>8} {'peak MB':>8} {'CPU s':>8} {'CPU/wall':>9}"
    )
    for p in real["processes"]:
        print(
            f"   {p['role']:<20} {p['pid']:>7} {p['rss_mb']:>8} {p['peak_rss_mb']:>8} "
            f"{p['cpu_s']:>8} {p['cpu_util']!s:>9}"
        )
    machine = result["machine"]
    print(
        f"   worker processes together: RSS peak {real['worker_rss_mb_sum_peak']} MB "
        f"(sum of each one's peak {real['worker_rss_mb_sum_of_peaks']} MB); "
        f"CPU {real['worker_cpu_s']} s = {real['worker_cpu_util']} of the machine"
    )
    groups = real.get("worker_groups", {})
    if len(groups) > 1:
        for name, g in groups.items():
            work = ", ".join(f"{n} {e}" for e, n in g.get("log", {}).items()) or "no work logged"
            print(
                f"   group {name}: {g['processes']} processes, peak RSS {g['peak_rss_mb']} MB, "
                f"CPU {g['cpu_s']} s = {g['cpu_util']} of the machine; {work}"
            )
    print(
        f"   other CPU s: {real['other_cpu_s']}, services {real['service_cpu_s']}; "
        f"machine busy {real['machine_cpu_util']}; load average before "
        f"{machine['load_average_before']}, after {machine.get('load_average_after')}; "
        f"host speed probes (lower is faster): {machine.get('cpu_probe_s')} s CPU, "
        f"{machine.get('statement_probe_ms')} ms per SELECT 1"
    )
    s = real["starvation"]
    print(
        f"\n   starvation: max {s.get('max_s')} s, p99 {s.get('p99_s')} s "
        f"(max/p99 {s.get('max_over_p99')}); waited over {STARVED_FACTOR:g} x p99: "
        f"{len(s.get('starved', []))}; unfinished: {len(s.get('unfinished', []))}; "
        f"p50/span {s.get('p50_over_span')}; overtaken by later requests: max "
        f"{s.get('overtaken_max')}, mean {s.get('overtaken_mean')}; latency slope "
        f"{s.get('latency_slope_s_per_s')} s per s of arrivals"
    )
    print(
        f"   states: {real['states']}; mail: {real['mail']['mails']} mails, duplicates "
        f"{real['mail']['duplicate_message_ids']}; exports: {real['exports']['export_rows']} "
        f"rows for {real['exports']['access_requests']} access requests"
    )
    e = store["effects"]
    print(
        f"   store: {e['erased']} erased (orders kept {e['erased_orders_retained']}/"
        f"{e['erased_orders_expected']}), everyone else untouched: {not e['others_changed']}"
    )
    print(f"   worker log events: {real['worker_log']}; scheduler: {real['scheduler_log']}")
    batching = ", ".join(
        f"{actor} {b['ids_per_message']}" for actor, b in real.get("batching", {}).items()
    )
    print(f"   ids per broker message: {batching}")
    for problem in result["problems"]:
        print(f"   !! {problem}")
    if result.get("profile"):
        tp.print_profile(result["profile"])
        print(result["profile"]["pstats_top25_own"])
    stacks = real.get("py_spy")
    if stacks and "samples" in stacks:
        print(
            f"\n== py-spy on the real workers: {stacks['samples']} on-CPU samples "
            f"({stacks['file']})"
        )
        for title_, key in (
            ("own, by package", "own_by_package"),
            ("own", "top_own"),
            ("cumulative", "top_cumulative"),
        ):
            print(f"   by {title_}:")
            for row in stacks[key]:
                print(f"     {100 * row['share']:5.1f}% {row['samples']:>7}  {row['function']}")
    print(
        f"   results: {result.get('json_file')}"
        + (f", {result['plot_file']}" if result.get("plot_file") else "")
    )


def print_heavy(heavy: dict[str, Any]) -> None:
    """The heavy requests' latency next to the light ones' of the first 10 % and of all."""
    rows = ", ".join(f"{t} {n:,}" for t, n in heavy["rows_each"].items())
    print(f"\n   heavy people: {heavy['people']}, each with extra rows {rows}")
    for r in heavy["requests"]:
        print(
            f"   heavy {r['type']:<8} #{r['position']:<4} received -> completed {r['done_s']} s, "
            f"-> last mail {r['mail_s']} s ({r['state']})"
        )
    for label, key in (
        (f"light, first {heavy['first_arrivals']} arrivals", "light_first"),
        ("light, all", "light_all"),
    ):
        done, mail = heavy[key].get("done", {}), heavy[key].get("mail", {})
        print(
            f"   {label:<28} n {done.get('n', 0):>4}: completed p50/p95/max "
            f"{done.get('p50_s')}/{done.get('p95_s')}/{done.get('max_s')} s, last mail "
            f"{mail.get('p50_s')}/{mail.get('p95_s')}/{mail.get('max_s')} s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # stopped with SIGTERM: unwind, so the processes, databases and Redis keys go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if opts.py_spy and py_spy_binary() is None:
        print(
            "--py-spy: no py-spy found; install it: .venv/bin/pip install py-spy", file=sys.stderr
        )
        return 2
    if not redis_answers(opts.broker_url):
        print(f"no Redis answers at {opts.broker_url}", file=sys.stderr)
        return 2
    result = run(opts)
    print_report(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
