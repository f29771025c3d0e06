"""The transactional outbox (DESIGN invariant 3).

A stage never talks to the broker inside its transaction: it adds an outbox row, keyed
so the same step asks for the same message once, and commits it with the state change.
After the commit the rows are published, those for the same actor together as one
message carrying a list of ids; the scheduler republishes rows whose publish never
happened (a crash between commit and enqueue).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

import structlog
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import OutboxRow, transaction, utcnow
from pipeline.errors import PermanentError

log = structlog.get_logger()


@dataclass(frozen=True)
class Envelope:
    """A message on its way to an actor: ids only, never personal data (invariant 2)."""

    id: str
    actor: str
    queue: str
    args: tuple[Any, ...]
    delay_ms: int | None = None


class MessageBus(Protocol):
    """Where envelopes go: dramatiq in production, anything in tests of the domain."""

    def publish(self, envelope: Envelope) -> None: ...

    def outstanding(self) -> int | None:
        """Messages the broker still holds (queued, delayed or being processed), or None
        when the broker cannot tell."""
        ...


@dataclass(frozen=True)
class Wanted:
    """A message a stage asks for: sent once per key, whatever happens after."""

    key: str
    actor: str
    queue: str
    args: tuple[Any, ...]


_OUTBOX = cast(Table, OutboxRow.__table__)


def add_all(session: Session, wanted: Sequence[Wanted]) -> list[Envelope]:
    """Insert the outbox rows of keys never asked before, in one statement; returns the
    envelopes of the rows it inserted (a key asked before, by this or an earlier
    transaction, gives none)."""
    unique = list({w.key: w for w in wanted}.values())
    if not unique:
        return []
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": str(uuid.uuid4()),
            "key": w.key,
            "actor": w.actor,
            "queue": w.queue,
            "args": list(w.args),
            "created_at": now,
            "publish_count": 0,
        }
        for w in unique
    ]
    # one statement whatever the number of rows (sent as multi-row VALUES): compiled once
    # per process, not once per batch size; on the table, not the mapped class, so the
    # rows skip the ORM's bulk-insert bookkeeping (nothing maps them back to objects)
    statement = _insert_new(session.get_bind().dialect.name)
    inserted = set(session.connection().execute(statement, rows).scalars())
    return [
        Envelope(id=r["id"], actor=r["actor"], queue=r["queue"], args=tuple(r["args"]))
        for r in rows
        if r["key"] in inserted
    ]


@functools.cache
def _insert_new(dialect: str) -> Any:
    insert: Any = pg_insert if dialect == "postgresql" else sqlite_insert
    return (
        insert(_OUTBOX)
        .on_conflict_do_nothing(index_elements=[_OUTBOX.c.key])
        .returning(_OUTBOX.c.key)
    )


BATCH_MAX = 50  # ids per message
RELAY_AFTER = timedelta(seconds=5)  # the relay publishes rows left unpublished this long
MARK_INTERVAL = 0.2  # seconds a publish waits to be recorded (`Marks`), far below RELAY_AFTER


def grouped(
    envelopes: Sequence[Envelope], *, limit: int = BATCH_MAX
) -> list[tuple[Envelope, list[str]]]:
    """One message per actor and further arguments, carrying the list of the envelopes'
    first arguments (request or notification ids), at most `limit` per message; each with
    the outbox ids it stands for. Order is kept within a group."""
    groups: dict[tuple[Any, ...], list[Envelope]] = {}
    for e in envelopes:
        groups.setdefault((e.actor, e.queue, e.delay_ms, json.dumps(e.args[1:])), []).append(e)
    out = []
    for members in groups.values():
        for start in range(0, len(members), limit):
            chunk = members[start : start + limit]
            first = chunk[0]
            ids = [i for e in chunk for i in as_ids(e.args[0])]
            message = Envelope(
                id=first.id,
                actor=first.actor,
                queue=first.queue,
                args=(ids, *first.args[1:]),
                delay_ms=first.delay_ms,
            )
            out.append((message, [e.id for e in chunk]))
    return out


def as_ids(ids: str | Sequence[str]) -> list[str]:
    """A stage message's first argument: one id (older messages, the reconciler) or a
    list of them (`grouped`)."""
    if isinstance(ids, str):
        return [ids]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
        raise PermanentError("the message's first argument must be an id or a list of ids")
    return list(ids)


Mark = tuple[str, datetime]  # an outbox row's id, and when its message went to the broker


def publish(
    factory: sessionmaker[Session],
    bus: MessageBus,
    envelopes: Sequence[Envelope],
    *,
    record: Callable[[list[Mark]], None] | None = None,
) -> int:
    """Publish committed envelopes, grouped into batch messages (`grouped`), then mark
    them published: at once in one transaction, or by `record` (`Marks`, later, together
    with other publishes). The rows of one message share its time.

    If publishing stops half way, what was sent is still marked and the error goes up:
    the rest stays unpublished for the relay.
    """
    sent: list[Mark] = []
    try:
        for message, members in grouped(envelopes):
            bus.publish(message)
            at = utcnow()
            sent.extend((member, at) for member in members)
    finally:
        if sent and record is not None:
            record(sent)
        elif sent:
            mark_published(factory, sent)
    return len(sent)


def mark_published(factory: sessionmaker[Session], marks: Sequence[Mark]) -> None:
    """Record publishes in one transaction (one statement, executed for every row)."""
    with transaction(factory) as session:
        session.connection().execute(_MARK, [{"row_id": row_id, "at": at} for row_id, at in marks])


_MARK = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("row_id"))
    .values(published_at=bindparam("at"), publish_count=_OUTBOX.c.publish_count + 1)
)


class _Background:
    """A daemon thread started on first need, and again in a forked worker (a thread
    does not survive the fork) or should it have died."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.target = target
        self.name = name
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self.target, name=self.name, daemon=True)
        self._thread.start()


class Marks:
    """Publishes recorded in the outbox a moment later, many in one transaction.

    Marking each publish at once costs every stage message a transaction of its own
    after its commit. Deferred by at most `interval`, the marks of all the process's
    publishes in that time go in one. Lost marks (the process dies first, or the database
    is away) only mean the relay publishes those rows again after `RELAY_AFTER`: stages
    are idempotent, so a repeated message does nothing. `interval` stays far below that.
    """

    def __init__(self, factory: sessionmaker[Session], *, interval: float) -> None:
        self.factory = factory
        self.interval = interval
        self._lock = threading.Condition()
        self._pending: list[Mark] = []
        self._recorder = _Background(self._run, "outbox-marks")

    def add(self, marks: list[Mark]) -> None:
        with self._lock:
            self._pending.extend(marks)
            self._recorder.ensure()
            self._lock.notify()

    def flush(self) -> None:
        with self._lock:
            taken, self._pending = self._pending, []
        if not taken:
            return
        try:
            mark_published(self.factory, taken)
        except Exception as error:  # the relay publishes them again: a repeat, not a loss
            log.warning("outbox_marks_lost", error=type(error).__name__, count=len(taken))

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
            time.sleep(self.interval)
            self.flush()


def publish_pending(
    factory: sessionmaker[Session],
    bus: MessageBus,
    *,
    older_than: timedelta,
    limit: int = 500,
) -> int:
    """The relay: publish rows committed a while ago and never published (a crash between
    commit and publish, or a broker that was down)."""
    with transaction(factory) as session:
        rows = (
            session.execute(
                select(OutboxRow)
                .where(
                    OutboxRow.published_at.is_(None), OutboxRow.created_at <= utcnow() - older_than
                )
                .order_by(OutboxRow.created_at)
                .limit(limit)
            )
            .scalars()
            .all()
        )
        pending = [
            Envelope(id=r.id, actor=r.actor, queue=r.queue, args=tuple(r.args)) for r in rows
        ]
    sent = publish(factory, bus, pending)
    if sent:
        log.info("outbox_relayed", count=sent)
    return sent


class Pressure:
    """How far behind this process's workers are: a moving average of how long the
    messages they take waited in their queues (fed by the worker, `observe`).

    `stretch` is the factor the publisher's windows grow by under pressure: 1 while the
    messages wait less than `target_ms`, up to `most` as the wait grows past it. A
    request then waits a little longer for others to share its messages when it would
    wait in a queue anyway; the larger groups cost the workers less per request, which
    is what lets them catch up. With time to spare the windows stay short, so latency
    does not pay for batching that saves nothing."""

    def __init__(self, *, target_ms: float = 100.0, most: float = 2.5, weight: float = 0.2):
        self.target_ms = target_ms
        self.most = most
        self.weight = weight
        self.lag_ms = 0.0

    def observe(self, lag_ms: float) -> None:
        # a float assignment: threads may race, and an estimate loses nothing by it
        self.lag_ms += self.weight * (max(0.0, lag_ms) - self.lag_ms)

    def stretch(self) -> float:
        return min(self.most, max(1.0, self.lag_ms / self.target_ms))


@dataclass
class _Lane:
    """Envelopes that share a window: their own pending list and last publish."""

    window: float
    pressure: Pressure | None = None
    pending: list[Envelope] = field(default_factory=list)
    last: float = -float("inf")

    def current(self) -> float:
        """The window now: stretched under pressure (`Pressure`)."""
        return self.window * (self.pressure.stretch() if self.pressure is not None else 1.0)

    def due(self) -> float:
        return self.last + self.current()


class Publisher:
    """Publishes what committed transactions asked for.

    With a `window`, it coalesces like Nagle's algorithm: envelopes arriving after a
    quiet spell go out at once; envelopes arriving while others went out less than
    `window` ago wait for the window to close and go together, grouped into batch
    messages. Under load, requests that move at the same moment share messages; alone,
    a request waits for nothing. `windows` gives some actors a window of their own
    (the first stage, where groups form: `Settings.gather_window_ms`); `pressure`
    stretches every window while the workers fall behind (`Pressure`). Envelopes still
    waiting when the process dies are in the outbox, unpublished: the scheduler's relay
    sends them.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        bus: Callable[[], MessageBus],
        *,
        window: timedelta,
        windows: Mapping[str, timedelta] | None = None,
        pressure: Pressure | None = None,
    ) -> None:
        self.factory = factory
        self.bus = bus  # asked at each publish: the app's bus may be swapped (tests)
        self.window = window.total_seconds()
        self.pressure = pressure
        self._default = _Lane(self.window, pressure)
        self._lanes = {
            actor: _Lane(w.total_seconds(), pressure) for actor, w in (windows or {}).items()
        }
        self._lock = threading.Condition()
        self._flusher = _Background(self._run, "outbox-publisher")
        # publishing at once (no window: tests, one-off tools) marks at once too
        self.marks = Marks(factory, interval=MARK_INTERVAL) if self.window > 0 else None

    def _lane(self, envelope: Envelope) -> _Lane:
        return self._lanes.get(envelope.actor, self._default)

    def submit(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        if self.window <= 0:
            self._publish(list(envelopes))
            return
        now_out: list[Envelope] = []
        with self._lock:
            now = time.monotonic()
            by_lane: dict[int, tuple[_Lane, list[Envelope]]] = {}
            for e in envelopes:
                lane = self._lane(e)
                by_lane.setdefault(id(lane), (lane, []))[1].append(e)
            waiting = False
            for lane, members in by_lane.values():
                if not lane.pending and now - lane.last >= lane.current():
                    lane.last = now
                    now_out.extend(members)
                else:
                    lane.pending.extend(members)
                    waiting = True
            if waiting:
                self._flusher.ensure()
                self._lock.notify()
        if now_out:
            self._publish(now_out)

    def flush(self) -> None:
        """Publish whatever waits, and record what was published, now (tests; a process
        about to stop)."""
        with self._lock:
            taken = self._take(until=float("inf"))
        self._publish(taken)
        if self.marks is not None:
            self.marks.flush()

    def _all_lanes(self) -> list[_Lane]:
        return [self._default, *self._lanes.values()]

    def _take(self, *, until: float) -> list[Envelope]:
        """The pending envelopes of the lanes whose window closes by `until`; their
        window starts again now."""
        taken: list[Envelope] = []
        now = time.monotonic()
        for lane in self._all_lanes():
            if lane.pending and lane.due() <= until:
                taken.extend(lane.pending)
                lane.pending = []
                lane.last = now
        return taken

    def _run(self) -> None:
        while True:
            with self._lock:
                while not any(lane.pending for lane in self._all_lanes()):
                    self._lock.wait()
                due = min(lane.due() for lane in self._all_lanes() if lane.pending)
            time.sleep(max(0.0, due - time.monotonic()))
            with self._lock:
                taken = self._take(until=time.monotonic())
            self._publish(taken)

    def _publish(self, envelopes: list[Envelope]) -> None:
        if not envelopes:
            return
        try:
            publish(
                self.factory,
                self.bus(),
                envelopes,
                record=self.marks.add if self.marks is not None else None,
            )
        except Exception as error:  # the scheduler's relay publishes them later
            log.warning("outbox_publish_deferred", error=type(error).__name__, count=len(envelopes))
