"""The tamper-evident audit log (DESIGN invariant 7, R28).

Each entry's hash covers its content and the previous entry's hash, so changing,
removing or reordering any row breaks the chain from there on. Details hold ids,
counts and keyed hashes only, never personal data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipeline.db import AuditRow, utcnow

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


def record(
    session: Session,
    action: str,
    *,
    request_id: str | None = None,
    actor: str = "system",
    **detail: Any,
) -> AuditRow:
    """Append an entry in the caller's transaction, chained to the current head.

    The head is read once per transaction, under the chain lock (PostgreSQL advisory
    lock; SQLite's write lock), and then followed in memory for further entries.
    """
    transaction = session.get_transaction()
    cached = session.info.get("audit_head")
    if cached is not None and cached[0] is transaction:
        prev = cached[1]
    else:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CHAIN_LOCK})
        head = session.execute(select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1)).scalar()
        prev = head or GENESIS
    at = utcnow()
    clean = json.loads(json.dumps(detail, default=str))
    row = AuditRow(
        at=at,
        actor=actor,
        action=action,
        request_id=request_id,
        detail=clean,
        prev_hash=prev,
        hash=_entry_hash(prev, at, actor, action, request_id, clean),
    )
    session.add(row)
    session.flush()
    session.info["audit_head"] = (transaction, row.hash)
    return row


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
