"""The benchmark's workload, shared by the real run, the no-op run and the profile pass.

A batch is a fixed mix of request types aimed at distinct seeded people (an erase never
shares its person with another request, or access and erase would race on the same
records). Each request that needs proof of identity carries an assertion signed with
the demo intake key, so no confirmation email is involved.

A `HopPlan` says which messages one request costs: the no-op actors replay exactly
that many hops, so the baseline moves the same messages as the real pipeline.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline import contract
from pipeline.states import RequestType, needs_locate, needs_verification

TYPE_MIX: dict[str, int] = {"access": 30, "correct": 20, "erase": 20, "opt_out": 20, "concern": 10}
INTAKE_SYSTEM = "allego-app"
# identity table and its name column per demo SQL store: where the seeded people live
_IDENTITY_TABLES = {
    "video": "users",
    "coaching": "users",
    "learning": "learners",
    "marketing": "leads",
    "billing": "accounts",
}


@dataclass(frozen=True)
class Person:
    email: str
    name: str


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    kind: str
    person: Person


def type_counts(total: int, mix: Mapping[str, int] = TYPE_MIX) -> dict[str, int]:
    """Split `total` by the mix's weights (largest remainder, so the counts add up)."""
    weight = sum(mix.values())
    exact = {k: total * w / weight for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    short = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[:short]:
        counts[k] += 1
    return counts


def seeded_people(data_dir: Path) -> list[Person]:
    """Every distinct person in the seeded SQL stores, in a stable order."""
    found: dict[str, Person] = {}
    for store, table in _IDENTITY_TABLES.items():
        with sqlite3.connect(Path(data_dir) / "stores" / f"{store}.db") as conn:
            for email, name in conn.execute(f"SELECT email, name FROM {table}"):  # noqa: S608
                key = str(email).strip().lower()
                found.setdefault(key, Person(key, str(name or "")))
    return [found[k] for k in sorted(found)]


def plan_batch(
    total: int, people: Sequence[Person], *, prefix: str, seed: int = 7
) -> list[BenchRequest]:
    """`total` requests in the mix, shuffled; erasures get people nobody else touches."""
    rng = random.Random(seed)
    kinds = [k for k, n in type_counts(total).items() for _ in range(n)]
    rng.shuffle(kinds)
    pool = list(people)
    rng.shuffle(pool)
    erasures = kinds.count(RequestType.ERASE.value)
    if len(pool) < erasures + 1:
        raise ValueError(f"{len(pool)} seeded people are too few for {erasures} erasures")
    exclusive, shared = pool[:erasures], pool[erasures:]
    batch: list[BenchRequest] = []
    for i, kind in enumerate(kinds):
        if kind == RequestType.ERASE.value:
            person = exclusive.pop()
        else:  # distinct people while they last, then round again
            person = shared[len(batch) % len(shared)]
        batch.append(BenchRequest(f"{prefix}-{i:05d}", kind, person))
    return batch


def document(
    request: BenchRequest,
    intake_key: bytes,
    *,
    request_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The intake document, pre-verified by a signed assertion where the type needs one."""
    now = now or datetime.now(UTC)
    rid = request_id or request.request_id
    doc: dict[str, Any] = {
        "schema": contract.SCHEMA_ID,
        "request_id": rid,
        "type": request.kind,
        "subject": {"email": request.person.email, "name": request.person.name or "Someone"},
        "jurisdiction": "gdpr",
        "received_at": now.isoformat().replace("+00:00", "Z"),
        "channel": "in_app",
    }
    if request.kind == RequestType.CORRECT.value:
        doc["corrections"] = [
            {"field": "job_title", "value": "Director of Enablement"},
            {"field": "company", "value": "Allego Benchmarks Inc"},
        ]
    if request.kind == RequestType.CONCERN.value:
        doc["concern"] = {"message": "Why did I get a marketing email from you?"}
    if needs_verification(RequestType(request.kind)):
        # signed over the real id: the no-op run never checks it, the pipeline does
        doc["verification"] = contract.sign_assertion(
            intake_key,
            request_id=rid,
            kind=request.kind,
            email=request.person.email,
            system=INTAKE_SYSTEM,
            expires_at=now + timedelta(hours=1),
        )
    return doc


def noop_done_key(namespace: str) -> str:
    """Redis counter the no-op run bumps when a request's outcome mail is "sent"."""
    return f"{namespace}:bench:done"


def noop_last_done_key(namespace: str) -> str:
    """Redis key holding the time (epoch seconds) of the latest no-op outcome mail."""
    return f"{namespace}:bench:last_done"


@dataclass(frozen=True)
class HopPlan:
    """The messages one pre-verified request costs, and how it travels in a request id.

    intake -> send_email (ack) + verify_request -> locate_request -> locate_store x locate
    -> act_on_request -> act_on_store x act -> finish_request [-> recheck_store x recheck
    -> finish_request] -> notify_outcome -> send_email (outcome). A concern skips locate
    and finish; a request with nothing to act on goes from act_on_request to finish.
    """

    kind: str
    locate: int
    act: int
    recheck: int = 0

    @classmethod
    def expected(cls, kind: str, stores: int) -> HopPlan:
        """The most a request of this kind can cost: every store holds the person."""
        rtype = RequestType(kind)
        if not needs_locate(rtype):
            return cls(kind, 0, 0)
        return cls(kind, stores, stores, stores if rtype is RequestType.ERASE else 0)

    @property
    def messages(self) -> int:
        fixed = 5  # intake, ack mail, verify, notify, outcome mail
        if self.kind == RequestType.CONCERN.value:
            return fixed + 1  # act_on_request
        finishes = 2 if self.recheck else 1
        return fixed + 1 + self.locate + 1 + self.act + self.recheck + finishes

    def tag(self, request_id: str) -> str:
        return f"{request_id}:{self.kind}:{self.locate}:{self.act}:{self.recheck}"

    @classmethod
    def from_tag(cls, tagged: str) -> tuple[str, HopPlan]:
        rid, kind, locate, act, recheck = tagged.rsplit(":", 4)
        return rid, cls(kind, int(locate), int(act), int(recheck))
