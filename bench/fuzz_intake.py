"""A long fuzz run over the intake stage: mutated and random documents through
`pipeline.intake.accept` against a real state database, judged one by one.

    .venv/bin/python bench/fuzz_intake.py --seconds 600                 # coverage-guided
    .venv/bin/python bench/fuzz_intake.py --seconds 60 --engine random  # no atheris

Engines:
- `atheris` (default): Google's coverage-guided fuzzer (libFuzzer) drives the input
  bytes; the intake contract, the intake stage and jsonschema are instrumented, so
  inputs that reach new branches are kept and mutated further.
- `random`: the same document builder fed by a seeded `random.Random`.

Each input becomes one of: raw bytes (the JSON parser's path), a random JSON value, or a
valid document of one of the five types with mutations applied: a field removed, an
unknown field added, a value swapped for another type, a huge string, deep nesting,
control characters, CRLF header injection, SQL and HTML fragments, lone surrogates,
invalid UTF-8. Every input must end as `accepted`, `duplicate` or `rejected` with a
known code and a reason that never echoes a value from the document; a rejection must
be recorded in `rejections`; anything else (an exception) is a crash, saved to
`--crashes` and counted. Documents built from the valid template with nothing broken
must be accepted (or be duplicates): a valid request is never lost.

Prints a report and writes it as JSON (`--report`, default
bench/results/fuzz-intake-<timestamp>.json). Exits 1 if anything crashed or was judged
wrong. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `pipeline` importable
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
TYPES = ("access", "correct", "erase", "opt_out", "concern")
NASTY = (
    "x@example.com\r\nBcc: victim@example.org",
    "Dana\r\nSubject: you won",
    "'; DROP TABLE requests; --",
    '" OR 1=1 --',
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "{{ 7*7 }}",
    "${jndi:ldap://x}",
    "\x00\x01\x02\x1b[31m",
    "\u202eevil\u200b\ufeff",
    "\ud800",
    "é" * 3,
    "🙂" * 5,
    " ",
    "",
)


class Chooser(Protocol):
    def number(self, low: int, high: int) -> int: ...

    def blob(self, n: int) -> bytes: ...

    def chars(self, n: int) -> str: ...


class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def number(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def blob(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def chars(self, n: int) -> str:
        return "".join(
            chr(self.rng.choice((self.rng.randint(0, 0x7F), self.rng.randint(0, 0x10FFFF))))
            for _ in range(n)
        )


class ProviderChooser:
    """Choices read from the fuzzer's bytes, so its mutations steer the document."""

    def __init__(self, provider: Any):
        self.p = provider

    def number(self, low: int, high: int) -> int:
        return int(self.p.ConsumeIntInRange(low, high))

    def blob(self, n: int) -> bytes:
        return bytes(self.p.ConsumeBytes(n))

    def chars(self, n: int) -> str:
        return str(self.p.ConsumeUnicodeNoSurrogates(n))


def valid_document(kind: str, serial: int) -> dict[str, Any]:
    from pipeline.contract import SCHEMA_ID

    doc: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "request_id": f"fuzz-{serial}",
        "type": kind,
        "subject": {
            "email": f"person{serial % 997}@example.com",
            "name": "Dana Reyes",
            "phone": "+1 555 010 0100",
            "product_ids": {"video": f"u{serial % 997}"},
        },
        "jurisdiction": ("gdpr", "ccpa")[serial % 2],
        "received_at": "2026-11-20T10:00:00Z",
        "channel": "web",
    }
    if kind == "correct":
        doc["corrections"] = [{"field": "name", "value": "Dana R. Reyes"}]
    if kind == "concern":
        doc["concern"] = {"message": "Why do you email me?\nPlease stop."}
    return doc


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if len(prefix) >= 6:  # a deep value an earlier mutation put there: not walked into
        return found
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(_paths(item, (*prefix, i)))
    return found


def _set(doc: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value


def odd_value(c: Chooser, depth: int = 0) -> Any:
    kind = c.number(0, 13)
    if kind == 0:
        return c.number(-(2**63), 2**63)
    if kind == 1:
        return [1e308, -0.0, 1.5][c.number(0, 2)]
    if kind == 2:
        return bool(c.number(0, 1))
    if kind == 3:
        return None
    if kind == 4:
        return "A" * c.number(200, 300_000)  # huge
    if kind == 5:
        nested: Any = "deep"
        for _ in range(c.number(10, 2000)):
            nested = [nested] if c.number(0, 1) else {"k": nested}
        return nested
    if kind == 6:
        return NASTY[c.number(0, len(NASTY) - 1)]
    if kind == 7:
        return c.chars(c.number(0, 64))
    if kind == 8:
        return c.blob(c.number(0, 32)).decode("utf-8", "surrogateescape")  # invalid UTF-8
    if kind == 9 and depth < 3:
        return [odd_value(c, depth + 1) for _ in range(c.number(0, 4))]
    if kind == 10 and depth < 3:
        return {c.chars(c.number(0, 8)): odd_value(c, depth + 1) for _ in range(c.number(0, 4))}
    if kind == 11:
        return "".join(chr(c.number(0, 31)) for _ in range(c.number(1, 8)))  # control characters
    if kind == 12:
        return "2026-02-30T25:61:00Z"
    return f"{NASTY[c.number(0, len(NASTY) - 1)]}{c.chars(c.number(0, 16))}"


@dataclass
class Built:
    document: Any
    intact: bool  # built from the valid template with nothing broken: must be accepted


def build(c: Chooser, serial: int) -> Built:
    mode = c.number(0, 9)
    if mode == 0:  # raw bytes: the JSON parser's path
        return Built(c.blob(c.number(0, 512)), False)
    if mode == 1:  # any JSON-like value
        return Built(odd_value(c), False)
    doc = valid_document(TYPES[c.number(0, len(TYPES) - 1)], serial)
    mutations = c.number(0, 3) if mode < 9 else 0
    for _ in range(mutations):
        paths = _paths(doc)
        path = paths[c.number(0, len(paths) - 1)]
        action = c.number(0, 3)
        if action == 0:
            _set(doc, path, None, delete=True)
        elif action == 1:
            doc[c.chars(c.number(1, 12)) or "extra"] = odd_value(c)
        else:
            _set(doc, path, odd_value(c))
    if mode == 8 and mutations:  # the mutated document as bytes, as a queue would carry it
        try:
            return Built(
                json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogateescape"), False
            )
        except (ValueError, RecursionError):
            return Built(doc, False)
    return Built(doc, mutations == 0)


def strings_in(value: Any, depth: int = 0) -> list[str]:
    """The document's text that a reason must never echo: every value, and every key
    but the plain identifiers the contract names as unknown fields."""
    if depth > 50:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        keys = [k for k in value if isinstance(k, str) and not (k.isidentifier() and len(k) <= 40)]
        return keys + [s for v in value.values() for s in strings_in(v, depth + 1)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v, depth + 1)]
    return []


@dataclass
class Report:
    engine: str
    seconds: float = 0.0
    tried: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    intact_tried: int = 0
    crashes: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    rejection_rows: int | None = None
    request_rows: int | None = None

    @property
    def ok(self) -> bool:
        return (
            not self.crashes
            and not self.wrong
            and self.rejection_rows == self.rejected
            and self.request_rows == self.accepted
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["codes"] = dict(self.codes.most_common())
        data["docs_per_second"] = round(self.tried / self.seconds, 1) if self.seconds else None
        data["ok"] = self.ok
        return data


class Judge:
    """Runs one input through intake and checks the outcome."""

    def __init__(self, app: Any, report: Report, crashes_dir: Path):
        from pipeline import contract, intake

        self.app = app
        self.report = report
        self.crashes_dir = crashes_dir
        self.accept = intake.accept
        self.known_codes = contract.REJECTION_CODES
        self.serial = 0

    def __call__(self, chooser: Chooser, raw: bytes | None = None) -> None:
        self.serial += 1
        built = build(chooser, self.serial)
        report = self.report
        report.tried += 1
        report.intact_tried += built.intact
        try:
            result = self.accept(self.app, built.document)
        except Exception:
            report.crashes.append(traceback.format_exc(limit=8)[-2000:])
            self._save(raw, built)
            raise
        if result.status == "rejected":
            report.rejected += 1
            report.codes[result.code or "?"] += 1
            problem = self._check_rejection(result.code, result.reason, built.document)
            if built.intact:
                problem = problem or f"a valid document was rejected ({result.code})"
        elif result.status in ("accepted", "duplicate"):
            setattr(report, result.status, getattr(report, result.status) + 1)
            problem = None
        else:
            problem = f"unknown outcome {result.status!r}"
        if problem:
            report.wrong.append(problem)
            self._save(raw, built)

    def _check_rejection(self, code: str | None, reason: str | None, document: Any) -> str | None:
        if code not in self.known_codes:
            return f"rejected with an unknown code {code!r}"
        if not reason:
            return f"rejected ({code}) without a reason"
        for value in strings_in(document):
            if len(value) >= 8 and value in reason and value not in _FIELD_WORDS:
                return f"the reason for {code} echoes a value from the document"
        return None

    def _save(self, raw: bytes | None, built: Built) -> None:
        self.crashes_dir.mkdir(parents=True, exist_ok=True)
        name = self.crashes_dir / f"input-{self.report.tried}"
        if raw is not None:
            name.with_suffix(".bin").write_bytes(raw)
        else:
            name.with_suffix(".txt").write_text(repr(built.document)[:100_000])


_FIELD_WORDS = {
    "request_id", "received_at", "jurisdiction", "product_ids", "corrections", "verification",
    "subject.email", "subject.name", "subject.phone", "concern.message",
}  # fmt: skip


def make_app(folder: Path) -> Any:
    from pipeline.bootstrap import App
    from pipeline.migrate import upgrade
    from pipeline.settings import Settings

    class Collected:  # the next stage's messages: counted, not sent anywhere
        sent = 0

        def publish(self, envelope: Any) -> None:
            self.sent += 1

        def outstanding(self) -> int | None:
            return None

    settings = Settings(data_dir=folder / "data", database_url=f"sqlite:///{folder / 'state.db'}")
    app = App(settings)
    app.__dict__["bus"] = Collected()
    upgrade(app.engine)
    return app


def count_rows(app: Any) -> tuple[int, int]:
    from sqlalchemy import func, select

    from pipeline.db import RejectionRow, RequestRow

    with app.sessions() as session:
        return (
            int(session.scalar(select(func.count()).select_from(RejectionRow)) or 0),
            int(session.scalar(select(func.count()).select_from(RequestRow)) or 0),
        )


def quiet_logs() -> None:
    import structlog

    logging.disable(logging.CRITICAL)
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())


def finish(app: Any, report: Report, started: float, path: Path) -> int:
    report.seconds = round(time.monotonic() - started, 1)
    report.rejection_rows, report.request_rows = count_rows(app)
    data = report.as_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"engine {report.engine}: {report.tried} documents in {report.seconds} s "
          f"({data['docs_per_second']}/s)")  # fmt: skip
    print(f"  accepted {report.accepted}, duplicates {report.duplicate}, "
          f"rejected {report.rejected} ({len(report.codes)} codes), "
          f"intact valid documents {report.intact_tried}")  # fmt: skip
    for code, n in report.codes.most_common():
        print(f"    {code:<22} {n}")
    print(f"  rejections recorded {report.rejection_rows} / {report.rejected}; "
          f"requests stored {report.request_rows} / {report.accepted}")  # fmt: skip
    print(f"  crashes {len(report.crashes)}, wrong judgements {len(report.wrong)}")
    for problem in Counter(report.wrong).most_common(10):
        print(f"    {problem[1]} x {problem[0]}")
    print(f"  report: {path}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


def run_random(judge: Judge, seconds: float, seed: int) -> None:
    chooser = RandomChooser(random.Random(seed))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # counted as a crash; keep going
            judge(chooser)


def run_atheris(judge: Judge, seconds: float, seed: int, on_end: Callable[[], int]) -> None:
    import atheris

    deadline = time.monotonic() + seconds

    def one_input(data: bytes) -> None:
        if time.monotonic() >= deadline:
            os._exit(on_end())  # libFuzzer would otherwise exit without our report
        judge(ProviderChooser(atheris.FuzzedDataProvider(data)), data)

    judge.crashes_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-rss_limit_mb=4096", "-timeout=60", f"-artifact_prefix={judge.crashes_dir}/"]
    atheris.Setup([sys.argv[0], f"-seed={seed}", *flags], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=600, help="how long to fuzz (default 600)")
    p.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    p.add_argument("--seed", type=int, default=1)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    p.add_argument("--report", type=Path, default=RESULTS / f"fuzz-intake-{stamp}.json")
    p.add_argument("--crashes", type=Path, default=RESULTS / f"fuzz-intake-{stamp}-inputs")
    opts = p.parse_args(argv)

    if opts.engine == "atheris":
        import atheris

        with atheris.instrument_imports(
            include=["pipeline.contract", "pipeline.intake", "jsonschema"]
        ):
            import pipeline.contract  # noqa: F401
            import pipeline.intake  # noqa: F401
    quiet_logs()
    folder = Path(
        tempfile.mkdtemp(
            prefix="fuzz-intake-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
        )
    )
    app = make_app(folder)
    report = Report(engine=opts.engine)
    judge = Judge(app, report, opts.crashes)
    started = time.monotonic()

    def on_end() -> int:
        try:
            return finish(app, report, started, opts.report)
        finally:
            app.close()
            shutil.rmtree(folder, ignore_errors=True)

    if opts.engine == "atheris":
        run_atheris(judge, opts.seconds, opts.seed, on_end)  # ends the process
    run_random(judge, opts.seconds, opts.seed)
    return on_end()


if __name__ == "__main__":
    sys.exit(main())
