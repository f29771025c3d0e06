"""Unit of work: one transaction, plus the messages it asks for, published after commit."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.orm import Session

from pipeline import outbox
from pipeline.outbox import Envelope

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()


class UnitOfWork:
    def __init__(self, app: App):
        self.app = app
        self._sent: list[Envelope] = []
        self.session: Session

    def __enter__(self) -> UnitOfWork:
        self.session = self.app.sessions()
        self._sent = []
        return self

    def send(self, key: str, actor: str, queue: str, *args: Any) -> None:
        """Ask for a message, once per key, in this transaction."""
        envelope = outbox.add(self.session, key=key, actor=actor, queue=queue, args=args)
        if envelope is not None:
            self._sent.append(envelope)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.session.commit()
            else:
                self.session.rollback()
        finally:
            self.session.close()
        if exc_type is None and self._sent:
            try:
                outbox.publish(self.app.sessions, self.app.bus, self._sent)
            except Exception as error:  # the scheduler's relay publishes it later
                log.warning(
                    "outbox_publish_deferred", error=type(error).__name__, count=len(self._sent)
                )
