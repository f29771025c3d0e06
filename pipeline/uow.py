"""Unit of work: one transaction, plus the messages it asks for, published after commit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline import db, outbox
from pipeline.db import ExportRow, NotificationRow, RequestRow, StoreTaskRow
from pipeline.outbox import Envelope
from pipeline.requests import LOCKED, lock_all

if TYPE_CHECKING:
    from pipeline.bootstrap import App

_collector: ContextVar[list[Envelope] | None] = ContextVar("outgoing", default=None)


@contextmanager
def collecting() -> Iterator[list[Envelope]]:
    """Units of work opened inside hand their committed envelopes to the caller, who
    publishes them together (`pipeline.batch`), instead of publishing each on its own."""
    outgoing: list[Envelope] = []
    token = _collector.set(outgoing)
    try:
        yield outgoing
    finally:
        _collector.reset(token)


# rows that belong to one request: what a batch reads for all its requests at once
Owned = TypeVar("Owned", StoreTaskRow, ExportRow, NotificationRow)


class Shared:
    """One transaction for the steps of a batch (`shared`): each step's units of work
    run in it, each inside its own savepoint, and it commits once at the end."""

    def __init__(self, session: Session):
        self.session = session
        self.wanted: list[outbox.Wanted] = []
        self.requests: list[RequestRow] = []
        self._owned: dict[type[Any], dict[str, list[Any]]] = {}

    def owned(self, model: type[Owned], request_id: str) -> list[Owned] | None:
        """The `model` rows of a request this transaction holds: on first use, read for
        every held request in one query, so a batch's steps ask the database once, not
        once each. None for a request it does not hold (the caller asks the database).
        The list is the batch's own: a step that adds a row appends it (`UnitOfWork.add`)."""
        held = self.session.info.get(LOCKED, set())
        if request_id not in held:
            return None
        by_request = self._owned.setdefault(model, {})
        if request_id not in by_request:  # the first use, or a request held since
            unread = sorted(held - by_request.keys())
            by_request.update((rid, []) for rid in unread)
            query = select(model).where(model.request_id.in_(unread))
            for row in self.session.execute(query).scalars():
                by_request[row.request_id].append(row)
        return by_request[request_id]

    def forget(self) -> None:
        """A step was undone: what was read or added for the batch may be stale."""
        self._owned.clear()

    def lock_requests(self, request_ids: list[str]) -> None:
        """Load and lock the batch's requests at once; `requests.load` then finds them."""
        self.hold(lock_all(self.session, request_ids))

    def hold(self, rows: list[RequestRow]) -> None:
        """Rows this transaction has locked: `requests.load` finds them without a query."""
        # held: the identity map keeps objects only while someone references them
        self.requests.extend(rows)
        self.session.info.setdefault(LOCKED, set()).update(r.id for r in rows)

    @contextmanager
    def step(self) -> Iterator[None]:
        """One id's work: undone alone (savepoint), with its messages and history (audit
        entries, transitions), if it raises."""
        wanted, at_commit = len(self.wanted), db.pending_at_commit(self.session)
        savepoint = self.session.begin_nested()
        try:
            yield
        except BaseException:
            savepoint.rollback()
            self.forget()
            del self.wanted[wanted:]
            db.restore_at_commit(self.session, at_commit)  # the earlier steps' history
            raise
        savepoint.commit()


_shared: ContextVar[Shared | None] = ContextVar("shared", default=None)


@contextmanager
def shared(app: App) -> Iterator[Shared]:
    """Units of work opened inside join one transaction, committed (with every message
    they asked for) when the block ends without error."""
    session = app.sessions()
    scope = Shared(session)
    token = _shared.set(scope)
    sent: list[Envelope] = []
    try:
        yield scope
        sent = outbox.add_all(session, scope.wanted)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        _shared.reset(token)
        session.close()
    outgoing = _collector.get()
    if outgoing is not None:
        outgoing.extend(sent)
    elif sent:
        app.publisher.submit(sent)


class UnitOfWork:
    def __init__(self, app: App):
        self.app = app
        self._wanted: list[outbox.Wanted] = []
        self._sent: list[Envelope] = []
        self._outgoing = _collector.get()
        self._scope = _shared.get()
        self.session: Session

    def __enter__(self) -> UnitOfWork:
        self._wanted = self._scope.wanted if self._scope is not None else []
        self.session = self._scope.session if self._scope is not None else self.app.sessions()
        self._sent = []
        return self

    def owned(self, model: type[Owned], request_id: str) -> list[Owned] | None:
        """A request's `model` rows as its batch read them at once (`Shared.owned`), or
        None outside a batch or for a request the batch does not hold."""
        return self._scope.owned(model, request_id) if self._scope is not None else None

    def rows_of(self, model: type[Owned], request_id: str) -> list[Owned]:
        """A request's `model` rows: from its batch's one read (`owned`), or else read
        for this request alone."""
        batch = self.owned(model, request_id)
        if batch is not None:
            return batch
        query = select(model).where(model.request_id == request_id)
        return list(self.session.execute(query).scalars())

    def add(self, row: Owned) -> None:
        """Add a request's new row, to the batch's reads as well: written at the flush
        that the commit (or the next query) makes, together with the others; a unique
        constraint it breaks (a concurrent delivery did the same) fails the commit."""
        self.session.add(row)
        rows = self.owned(type(row), row.request_id)
        if rows is not None:
            rows.append(row)

    def send(self, key: str, actor: str, queue: str, *args: Any) -> None:
        """Ask for a message, once per key; written to the outbox at commit."""
        self._wanted.append(outbox.Wanted(key, actor, queue, args))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._scope is not None:
            return  # the shared transaction commits, or its step's savepoint rolls back
        try:
            if exc_type is None:
                self._sent = outbox.add_all(self.session, self._wanted)
                self.session.commit()
            else:
                self.session.rollback()
        finally:
            self.session.close()
        if exc_type is None and self._sent and self._outgoing is not None:
            self._outgoing.extend(self._sent)
        elif exc_type is None and self._sent:
            self.app.publisher.submit(self._sent)
