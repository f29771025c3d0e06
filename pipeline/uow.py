"""Unit of work: one transaction, plus the messages it asks for, published after commit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from pipeline import outbox
from pipeline.outbox import Envelope

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


class UnitOfWork:
    def __init__(self, app: App):
        self.app = app
        self._wanted: list[outbox.Wanted] = []
        self._sent: list[Envelope] = []
        self._outgoing = _collector.get()
        self.session: Session

    def __enter__(self) -> UnitOfWork:
        self.session = self.app.sessions()
        self._wanted = []
        self._sent = []
        return self

    def send(self, key: str, actor: str, queue: str, *args: Any) -> None:
        """Ask for a message, once per key; written to the outbox at commit."""
        self._wanted.append(outbox.Wanted(key, actor, queue, args))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
