"""The tamper-evident audit log (DESIGN invariant 7, R28).

Each entry's hash covers its content and the previous entry's hash, so changing,
removing or reordering any row breaks the chain from there on. Entries are chained
when their transaction commits (`before_commit`), under the chain lock. Details hold ids,
counts and keyed hashes only, never personal data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session

from pipeline.db import AuditRow, add_at_commit, take_at_commit, utcnow

GENESIS = "0" * 64
_PG_CHAIN_LOCK = 7_245_001  # advisory lock id serialising appends on PostgreSQL


def _entry_hash(
    prev_hash: str,
    at: datetime,
    actor: str,
    action: str,
    request_id: str | None,
    detail: dict[str, Any],
) -> str:
    body = json.dumps(
        {
            "prev": prev_hash,
            "at": at.isoformat(),
            "actor": actor,
            "action": action,
            "request": request_id,
            "detail": detail,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    at: datetime
    actor: str
    action: str
    request_id: str | None
    detail: dict[str, Any]


_PENDING = "audit"  # entries waiting for the commit (`db.add_at_commit`)


def record(
    session: Session,
    action: str,
    *,
    request_id: str | None = None,
    actor: str = "system",
    **detail: Any,
) -> None:
    """Add an entry to the caller's transaction; it is written when the transaction
    commits, chained to the head of the log, and dropped if it rolls back.

    Chaining at commit keeps the chain lock (a PostgreSQL advisory lock; SQLite's write
    lock) for the last moment of a transaction only, instead of from its first entry to
    its commit: stages that commit at the same time wait for each other only that long.
    """
    clean = json.loads(json.dumps(detail, default=str))
    add_at_commit(session, _PENDING, _Entry(utcnow(), actor, action, request_id, clean))


@event.listens_for(Session, "before_commit")
def _chain_pending(session: Session) -> None:
    pending: list[_Entry] = take_at_commit(session, _PENDING)
    if not pending:
        return
    if session.get_bind().dialect.name == "postgresql":
        prev = session.execute(_LOCK_AND_HEAD, {"k": _PG_CHAIN_LOCK}).scalar() or GENESIS
    else:  # SQLite: the transaction's write lock serialises the appends
        prev = session.execute(_HEAD).scalar() or GENESIS
    rows = []
    for e in pending:
        digest = _entry_hash(prev, e.at, e.actor, e.action, e.request_id, e.detail)
        rows.append(
            {
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "request_id": e.request_id,
                "detail": e.detail,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    session.execute(_INSERT, rows)  # in order: the ids follow the chain


# built once: a statement object caches its compiled form. The function (migration 0006)
# takes the chain lock, then reads the head with a snapshot taken after the lock: one
# round trip instead of two.
_LOCK_AND_HEAD = text("SELECT privacy_audit_head(:k)")
_HEAD = select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1)
_INSERT = insert(AuditRow)


@dataclass(frozen=True)
class ChainReport:
    entries: int
    first_broken_id: int | None
    problem: str | None

    @property
    def intact(self) -> bool:
        return self.first_broken_id is None


def verify_chain(session: Session, *, batch: int = 5000) -> ChainReport:
    """Walk the chain in id order and name the first entry that does not fit."""
    prev = GENESIS
    count = 0
    last_id = 0
    while True:
        rows = (
            session.execute(
                select(AuditRow).where(AuditRow.id > last_id).order_by(AuditRow.id).limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            return ChainReport(count, None, None)
        for row in rows:
            count += 1
            if row.prev_hash != prev:
                return ChainReport(count, row.id, "its link to the previous entry is broken")
            expected = _entry_hash(prev, row.at, row.actor, row.action, row.request_id, row.detail)
            if expected != row.hash:
                return ChainReport(count, row.id, "its content does not match its hash")
            prev = row.hash
            last_id = row.id
