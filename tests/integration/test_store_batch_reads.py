"""Store tasks over a connector that reads in batches (`BatchReads`): the requests of a
store message are located, exported and re-checked in one call; if that call fails as
a whole, each request is run alone, so only the one that fails is retried or failed,
and no correction or erasure of the batch is made twice."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connectors.allego.seed import SQL_STORES, seed_demo_stores
from connectors.base import (
    Connector,
    Identity,
    LocateResult,
    StoreExport,
    StoreUnavailable,
)
from connectors.memory import MemoryConnector
from connectors.registry import close_all, load_connectors
from pipeline import contract, tasks, uow
from pipeline.db import StoreTaskRow
from pipeline.intake import accept
from tests.conftest import make_app
from tests.integration.support import QuietBus, document, request_row

EMAILS = ["ann.batch@example.com", "bo.batch@example.com", "cy.batch@example.com"]


class BatchMemory(MemoryConnector):
    """The reference connector with batch reads; reads for a person in `broken` fail
    (and with them the whole batch they are in)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken: set[str] = set()
        self.batches: list[tuple[str, int]] = []  # (method, people)

    def _check(self, identity: Identity) -> None:
        if identity.email in self.broken:
            raise StoreUnavailable(f"store {self.name!r} failed to read (simulated)")

    def locate(self, identity: Identity) -> LocateResult:
        self._check(identity)
        return super().locate(identity)

    def export(self, identity: Identity) -> StoreExport:
        self._check(identity)
        return super().export(identity)

    def locate_many(self, identities: Sequence[Identity]) -> list[LocateResult]:
        self.batches.append(("locate_many", len(identities)))
        return [self.locate(i) for i in identities]

    def export_many(self, identities: Sequence[Identity]) -> list[StoreExport]:
        self.batches.append(("export_many", len(identities)))
        return [self.export(i) for i in identities]


def batch_store() -> BatchMemory:
    return BatchMemory(
        "crm",
        people=[
            {"id": f"c{n}", "email": email, "name": "Batch Person", "contact_ok": True}
            for n, email in enumerate(EMAILS)
        ],
        records={"notes": [{"id": f"n{n}", "owner": f"c{n}"} for n in range(len(EMAILS))]},
    )


def presigned_as(app: Any, kind: str, request_id: str, email: str) -> dict[str, Any]:
    token = contract.sign_assertion(
        app.keys.intake_keys["allego-app"],
        request_id=request_id,
        kind=kind,
        email=email,
        system="allego-app",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    subject = {"email": email, "name": "Batch Person", "phone": "+1 555 0100"}
    return document(kind, request_id, verification=token, subject=subject)


def submit_together(app: Any, requests: Sequence[tuple[str, str, str]]) -> None:
    """(request id, kind, email) accepted at once, so they travel in the same messages."""
    with uow.collecting() as outgoing:
        for request_id, kind, email in requests:
            assert accept(app, presigned_as(app, kind, request_id, email)).status == "accepted"
    app.publisher.submit(outgoing)


def task_column(app: Any, phase: str, column: str) -> dict[str, Any]:
    """`column` of the phase's store tasks, by request."""
    with app.sessions() as session:
        query = select(StoreTaskRow.request_id, getattr(StoreTaskRow, column))
        return dict(session.execute(query.where(StoreTaskRow.phase == phase)).all())


def attempts(app: Any, phase: str) -> dict[str, int]:
    return task_column(app, phase, "attempts")


class Events:
    """What the store task runner logs (structlog's own capture misses loggers another
    test's configuration has cached)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.seen.append({"event": event, **fields})

    warning = info


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    recorder = Events()
    monkeypatch.setattr(tasks, "log", recorder)
    return recorder


@pytest.fixture
def crm() -> BatchMemory:
    return batch_store()


@pytest.fixture
def app(state_url: str, tmp_path: Path, crm: BatchMemory) -> Any:
    application = make_app(state_url, tmp_path / "data", bus=QuietBus(), connectors={"crm": crm})
    yield application
    application.close()


def test_the_requests_of_a_store_message_are_located_and_exported_in_one_call(app, crm):
    submit_together(app, [(f"r-{n}", "access", email) for n, email in enumerate(EMAILS)])
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(3)] == ["done"] * 3
    assert crm.batches == [("locate_many", 3), ("export_many", 3)]
    with app.sessions() as session:
        results = dict(
            session.execute(
                select(StoreTaskRow.request_id, StoreTaskRow.result).where(
                    StoreTaskRow.phase == "act"
                )
            ).all()
        )
    assert {rid: r["records"] for rid, r in results.items()} == {"r-0": 2, "r-1": 2, "r-2": 2}


def test_a_batch_read_that_fails_runs_each_request_alone_and_retries_only_the_failing_one(
    app, crm, events
):
    crm.broken.add(EMAILS[1])
    submit_together(app, [(f"r-{n}", "access", email) for n, email in enumerate(EMAILS)])
    app.bus.drain()
    states = [request_row(app, f"r-{n}").state for n in range(3)]
    assert states == ["done", "needs_attention", "done"]
    tries = app.settings.store_max_attempts
    assert attempts(app, "locate") == {"r-0": 1, "r-1": tries, "r-2": 1}
    # the batch of three failed, then each ran alone; r-1 came back alone until it failed
    assert crm.batches[:4] == [("locate_many", 3)] + [("locate_many", 1)] * 3
    assert crm.batches.count(("locate_many", 1)) == 3 + tries - 1
    assert ("export_many", 2) in crm.batches  # the two others went on together
    logged = [(e["event"], e.get("request_id")) for e in events.seen]
    assert ("store_batch_failed", None) in logged
    assert {rid for event, rid in logged if event == "store_task_errored"} == {"r-1"}
    started = [rid for event, rid in logged if event == "store_task_started"]
    assert started.count("r-0") == started.count("r-2") == 2  # locate, act: once each
    assert "StoreUnavailable" in request_row(app, "r-1").state_reason


def test_a_failed_batch_export_is_retried_alone_without_erasing_or_correcting_twice(
    app, crm, events
):
    submit_together(
        app,
        [
            ("r-0", "access", EMAILS[0]),
            ("r-1", "erase", EMAILS[1]),
            ("r-2", "correct", EMAILS[2]),
        ],
    )
    failures = [1, 1]  # r-0's export fails twice: in the batch, then alone

    def export(identity: Identity) -> StoreExport:
        if identity.email == EMAILS[0] and failures:
            failures.pop()
            raise StoreUnavailable("store 'crm' failed to export (simulated)")
        return MemoryConnector.export(crm, identity)

    crm.export = export  # type: ignore[method-assign]
    app.bus.drain()
    failed = [e for e in events.seen if e["event"] == "store_batch_failed"]
    assert [(e["phase"], e["calls"]) for e in failed] == [("act", 3)]
    assert [request_row(app, f"r-{n}").state for n in range(3)] == ["done"] * 3
    # the batch of three (one export) failed; r-0 alone failed again, then passed
    assert crm.batches.count(("export_many", 1)) == 3
    assert crm.calls.count("erase") == 1 and crm.calls.count("correct") == 1
    assert attempts(app, "act") == {"r-0": 2, "r-1": 1, "r-2": 1}


def test_an_erasure_batch_is_rechecked_in_one_read(app, crm):
    submit_together(app, [(f"r-{n}", "erase", email) for n, email in enumerate(EMAILS)])
    app.bus.drain()
    assert [request_row(app, f"r-{n}").state for n in range(3)] == ["done"] * 3
    assert crm.batches == [("locate_many", 3), ("locate_many", 3)]  # locate, then recheck
    assert attempts(app, "recheck") == {"r-0": 1, "r-1": 1, "r-2": 1}


def test_a_batch_through_the_sql_stores_finds_for_each_what_locating_them_alone_finds(
    state_url: str, tmp_path: Path
) -> None:
    demo = seed_demo_stores(tmp_path / "demo", people=30, seed=11)
    stores: dict[str, Connector] = {
        name: c
        for name, c in load_connectors(None, Path(demo.data_dir)).items()
        if name in SQL_STORES
    }
    people = [p for p in demo.people.values() if p.records and "@" in p.email][:4]
    expected = {
        (f"r-{n}", store): len(stores[store].locate(person.identity()).records)
        for n, person in enumerate(people)
        for store in stores
    }
    app = make_app(state_url, tmp_path / "data", bus=QuietBus(), connectors=stores)
    try:
        submit_together(app, [(f"r-{n}", "access", p.email) for n, p in enumerate(people)])
        app.bus.drain()
        assert [request_row(app, f"r-{n}").state for n in range(len(people))] == ["done"] * len(
            people
        )
        with app.sessions() as session:
            tasks = session.execute(
                select(StoreTaskRow.request_id, StoreTaskRow.store, StoreTaskRow.result).where(
                    StoreTaskRow.phase == "locate"
                )
            ).all()
        assert {(rid, store): result["records"] for rid, store, result in tasks} == expected
    finally:
        app.close()
        close_all(stores)


@pytest.mark.parametrize("kind", ["access", "erase"])
def test_a_heavy_person_is_served_after_the_others_of_the_batch_have_moved_on(
    state_url: str, tmp_path: Path, kind: str
) -> None:
    crm = batch_store()
    crm.records["notes"] += [{"id": f"big{n}", "owner": "c1"} for n in range(5)]
    app = make_app(
        state_url, tmp_path / "data", bus=QuietBus(), connectors={"crm": crm}, heavy_records=4
    )
    seen_when_heavy: list[dict[str, str]] = []
    method = "export" if kind == "access" else "erase"
    plain = getattr(crm, method)

    def watched(identity: Identity, *args: Any) -> Any:
        if identity.email == EMAILS[1]:  # the heavy one: what is recorded by now?
            seen_when_heavy.append(task_column(app, "act", "status"))
        return plain(identity, *args)

    setattr(crm, method, watched)
    try:
        submit_together(app, [(f"r-{n}", kind, email) for n, email in enumerate(EMAILS)])
        app.bus.drain()
        assert [request_row(app, f"r-{n}").state for n in range(3)] == ["done"] * 3
        # located together; then the two light ones were served and recorded (their
        # tasks done, committed) before the heavy one's call began, which ran alone
        assert seen_when_heavy == [{"r-0": "done", "r-1": "pending", "r-2": "done"}]
        if kind == "access":
            assert crm.batches == [("locate_many", 3), ("export_many", 2), ("export_many", 1)]
        with app.sessions() as session:
            located = session.scalars(
                select(StoreTaskRow.result).where(
                    StoreTaskRow.phase == "locate", StoreTaskRow.request_id == "r-1"
                )
            ).one()
        assert located["records"] == 7 > app.settings.heavy_records
    finally:
        app.close()
