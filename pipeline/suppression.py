"""The suppression list (R25, R26): one call any sender makes before contacting someone.

It holds only a keyed hash of the address and why it is there, the minimum needed to
honour an opt-out or erasure after everything else about the person is gone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from pipeline.db import SuppressionRow

if TYPE_CHECKING:
    from pipeline.bootstrap import App


def suppress(session: Session, email_hash: str, reason: str) -> bool:
    """Add the hash (idempotent); returns True if it was new."""
    if session.get(SuppressionRow, email_hash) is not None:
        return False
    session.add(SuppressionRow(email_hash=email_hash, reason=reason))
    session.flush()
    return True


def is_contactable(email: str, *, app: App | None = None) -> bool:
    """False once the address opted out of contact or had its data erased.

    Every product's marketing sender calls this before sending; it reads one row by
    primary key.
    """
    if app is None:
        app = _default_app()
    with app.sessions() as session:
        return session.get(SuppressionRow, app.blind.email(email)) is None


_app: App | None = None


def _default_app() -> App:
    global _app
    if _app is None:
        from pipeline.bootstrap import App

        _app = App.from_env()
    return _app
