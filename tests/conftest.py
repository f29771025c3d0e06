"""Shared fixtures: state databases (SQLite and PostgreSQL), apps, an in-process bus."""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from pipeline.bootstrap import App
from pipeline.errors import TransientError
from pipeline.handlers import handle
from pipeline.migrate import upgrade
from pipeline.outbox import Envelope
from pipeline.settings import Settings

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    name = f"privacy_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def state_database(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every state-store test runs on SQLite and on PostgreSQL."""
    with state_database(request.param, tmp_path) as url:
        yield url


@dataclass
class InlineBus:
    """Runs published messages in this process, in order, when `drain` is called.

    Transient failures are re-queued (their delay ignored) so retries can be counted;
    `redeliver=True` runs every message twice, as an at-least-once broker may.
    """

    app: App | None = None
    queue: deque[Envelope] = field(default_factory=deque)
    delivered: list[Envelope] = field(default_factory=list)
    redeliver: bool = False

    def publish(self, envelope: Envelope) -> None:
        self.queue.append(envelope)

    def outstanding(self) -> int:
        return len(self.queue)

    def drain(self, *, limit: int = 2000) -> int:
        assert self.app is not None
        count = 0
        while self.queue:
            count += 1
            assert count <= limit, "messages kept coming: a loop in the pipeline?"
            envelope = self.queue.popleft()
            self.delivered.append(envelope)
            for _ in range(2 if self.redeliver else 1):
                try:
                    handle(self.app, envelope.actor, *envelope.args)
                except TransientError:
                    self.queue.append(envelope)
                    break
        return count


def make_app(
    state_url: str,
    data_dir: Path,
    *,
    connectors: dict[str, Any] | None = None,
    bus: InlineBus | None = None,
    **overrides: Any,
) -> App:
    overrides.setdefault("smtp_port", 1)
    overrides.setdefault("batch_window_ms", 0)  # publish at once: tests drain in order
    settings = Settings(data_dir=data_dir, database_url=state_url, **overrides)
    app = App(settings, connectors_override=connectors)
    if bus is not None:
        bus.app = app
        app.__dict__["bus"] = bus
    upgrade(app.engine)
    return app
