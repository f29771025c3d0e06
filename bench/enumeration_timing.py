"""Timing of the answers for known and unknown addresses (R8: no account enumeration).

    .venv/bin/python bench/enumeration_timing.py [--samples 300] [--warmup 20] \
        [--database sqlite|postgresql]

Seeds the demo product stores, then submits one access request per sample for an address
the stores hold (a seeded person, each used once) and one for an address no store holds,
in pairs whose order is drawn at random. For each request it times, in this process:

- `intake`: the intake stage (`pipeline.intake.accept`): validate, store, acknowledge;
- `verify`: the verify stage (`pipeline.verification.start`): mail the link;
- `page`: GET /verify/<token> through the web app (Flask's WSGI test client);
- `confirm`: the POST of the page's button (CSRF token and cookie), which verifies.

Nothing searches a store before the confirmation, so the two groups should not differ.
It prints, per step, the median and p95 of each group, the difference of the medians
with a 95 % bootstrap confidence interval, and the two-sided p-value of a Mann-Whitney U
test (are the two samples drawn from one distribution?). A confidence interval that
straddles 0 and a large p-value mean no difference was found at this sample size.
Results also go to bench/results/enumeration-<timestamp>.json. Timings are in-process:
they leave out the network, which adds the same for both groups. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `pipeline` importable
    sys.path.insert(0, str(REPO))

import structlog  # noqa: E402
from sqlalchemy import select  # noqa: E402

from bench.throughput import drop_namespace, state_database  # noqa: E402
from bench.workload import seeded_people  # noqa: E402
from connectors.allego.seed import seed_demo_stores  # noqa: E402
from connectors.base import Identity  # noqa: E402
from pipeline import contract, verification  # noqa: E402
from pipeline.bootstrap import App  # noqa: E402
from pipeline.db import NotificationRow  # noqa: E402
from pipeline.intake import accept  # noqa: E402
from pipeline.migrate import upgrade  # noqa: E402
from pipeline.outbox import Envelope  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.web import create_app  # noqa: E402

STEPS = ("intake", "verify", "page", "confirm")
GROUPS = ("known", "unknown")
UNLIMITED = "1000000/minute"  # the bench is one caller: the web limits would stop it


class DiscardingBus:
    """The stages' follow-up messages (mails, locate) are not part of what is timed."""

    def publish(self, envelope: Envelope) -> None:
        pass

    def outstanding(self) -> int:
        return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=300, help="requests per group (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed pairs first (default 20)")
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--seed", type=int, default=7, help="random order of each pair")
    p.add_argument(
        "--broker-url", default=os.environ.get("PRIVACY_BROKER_URL", Settings.broker_url)
    )
    p.add_argument(
        "--pg-admin-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="where to CREATE/DROP the throwaway state database",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation, ties
    corrected, continuity corrected): fine for samples of a few dozen and more."""
    n1, n2 = len(a), len(b)
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    r1 = sum(r for r, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    if sigma == 0:
        return 1.0
    z = (abs(u1 - n1 * n2 / 2) - 0.5) / sigma
    return math.erfc(max(z, 0.0) / math.sqrt(2))


def bootstrap_median_diff(
    a: Sequence[float], b: Sequence[float], *, rounds: int = 2000, seed: int = 11
) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of median(a) - median(b)."""
    rng = random.Random(seed)
    diffs = sorted(
        statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
        for _ in range(rounds)
    )
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    report: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        known, unknown = samples[step]["known"], samples[step]["unknown"]
        low, high = bootstrap_median_diff(known, unknown)
        report[step] = {
            "n": [len(known), len(unknown)],
            "known_median_ms": statistics.median(known),
            "known_p95_ms": percentile(known, 0.95),
            "unknown_median_ms": statistics.median(unknown),
            "unknown_p95_ms": percentile(unknown, 0.95),
            "median_diff_ms": statistics.median(known) - statistics.median(unknown),
            "median_diff_ci95_ms": [low, high],
            "mann_whitney_p": mann_whitney_p(known, unknown),
        }
    return report


# ---------------------------------------------------------------------------- the run


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter_ns()
    result = action()
    return (time.perf_counter_ns() - started) / 1e6, result


def access_document(request_id: str, email: str, name: str) -> dict[str, Any]:
    return {
        "schema": contract.SCHEMA_ID,
        "request_id": request_id,
        "type": "access",
        "subject": {"email": email, "name": name},
        "jurisdiction": "gdpr",
        "received_at": datetime.now(UTC).isoformat(),
        "channel": "web",
    }


def link_token(app: App, request_id: str) -> str:
    with app.sessions() as session:
        note = session.execute(
            select(NotificationRow).where(
                NotificationRow.request_id == request_id, NotificationRow.event == "verification"
            )
        ).scalar_one()
    context = app.keys.ring.decrypt_json(note.context_enc, context=note.id.encode())
    assert isinstance(context, dict)
    return str(context["link"]).rsplit("/verify/", 1)[1]


def one_request(app: App, client: Any, request_id: str, email: str, name: str) -> dict[str, float]:
    """One request through intake, verify, the page and its button; the time of each."""
    times: dict[str, float] = {}
    times["intake"], result = timed(lambda: accept(app, access_document(request_id, email, name)))
    assert result.status == "accepted", result
    times["verify"], _ = timed(lambda: verification.start(app, request_id))
    token = link_token(app, request_id)
    times["page"], page = timed(lambda: client.get(f"/verify/{token}"))
    assert page.status_code == 200, page.status_code
    csrf = re.search(rb'name="csrf" value="([0-9a-f]+)"', page.data)
    assert csrf is not None
    form = {"csrf": csrf.group(1).decode()}
    times["confirm"], done = timed(lambda: client.post(f"/verify/{token}", data=form))
    assert done.status_code == 200, done.status_code
    return times


def stores_hold(app: App, email: str) -> int:
    """How many records the product stores hold for the address (outside the timing)."""
    return sum(len(c.locate(Identity(email=email)).records) for c in app.connectors.values())


def run(args: argparse.Namespace) -> dict[str, Any]:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)
    )  # errors only: logging every stage would time the console
    folder = Path(tempfile.mkdtemp(prefix="privacy-enum-"))
    namespace = f"bench-enum-{uuid.uuid4().hex[:10]}"
    total = args.samples + args.warmup
    try:
        seed_demo_stores(folder, people=max(200, total + 20))
        known_people = seeded_people(folder)[:total]
        if len(known_people) < total:
            raise SystemExit(f"only {len(known_people)} seeded people for {total} samples")
        with state_database(args.database, folder, args.pg_admin_url) as url:
            settings = Settings(
                data_dir=folder,
                database_url=url,
                broker_url=args.broker_url,
                queue_namespace=namespace,
                smtp_port=1,
                verify_limit_per_address=UNLIMITED,
                verify_limit_per_email=UNLIMITED,
            )
            app = App(settings)
            app.__dict__["bus"] = DiscardingBus()
            upgrade(app.engine)
            try:
                known_records = [stores_hold(app, p.email) for p in known_people]
                unknown_records = [
                    stores_hold(app, f"nobody-{i:05d}@unknown.example") for i in range(total)
                ]
                if min(known_records) == 0 or max(unknown_records) != 0:
                    raise SystemExit("the known and unknown addresses are not what they claim")
                client = create_app(app).test_client()
                rng = random.Random(args.seed)
                samples: dict[str, dict[str, list[float]]] = {
                    s: {g: [] for g in GROUPS} for s in STEPS
                }
                for i, person in enumerate(known_people):
                    pair = [
                        ("known", person.email, person.name or "Someone"),
                        ("unknown", f"nobody-{i:05d}@unknown.example", "Nora Quist"),
                    ]
                    rng.shuffle(pair)
                    for group, email, name in pair:
                        times = one_request(app, client, f"{group}-{i:05d}", email, name)
                        if i >= args.warmup:
                            for step, ms in times.items():
                                samples[step][group].append(ms)
            finally:
                app.close()
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "database": args.database,
            "samples_per_group": args.samples,
            "warmup_pairs": args.warmup,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "known_records_in_stores": {
                "min": min(known_records),
                "median": statistics.median(known_records),
                "max": max(known_records),
            },
            "unknown_records_in_stores": max(unknown_records),
            "steps": summarise(samples),
        }
    finally:
        drop_namespace(args.broker_url, namespace)
        shutil.rmtree(folder, ignore_errors=True)


def print_report(report: dict[str, Any]) -> None:
    held = report["known_records_in_stores"]
    print(
        f"{report['samples_per_group']} requests per group, {report['database']}, "
        f"{report['machine']}; each known address has {held['min']}-{held['max']} records "
        f"in the stores (median {held['median']}), each unknown one "
        f"{report['unknown_records_in_stores']}"
    )
    head = (
        f"{'step':8} {'known p50':>10} {'p95':>8} {'unknown p50':>12} {'p95':>8} "
        f"{'diff p50':>9} {'95% CI of diff':>18} {'MWU p':>7}"
    )
    print(head)
    print("-" * len(head))
    for step, s in report["steps"].items():
        low, high = s["median_diff_ci95_ms"]
        print(
            f"{step:8} {s['known_median_ms']:>8.2f}ms {s['known_p95_ms']:>6.2f}ms "
            f"{s['unknown_median_ms']:>10.2f}ms {s['unknown_p95_ms']:>6.2f}ms "
            f"{s['median_diff_ms']:>+7.3f}ms {f'[{low:+.3f}, {high:+.3f}]':>18} "
            f"{s['mann_whitney_p']:>7.3f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"enumeration-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
