"""Who may use the dashboard, and what each may do (R29).

Operators sign in with a password hashed by scrypt (a memory-hard KDF, per-password
salt, constant-time comparison). A sign-in starts a server-side session: the browser's
cookie holds a random token, the database only its SHA-256, so sessions expire, end on
sign-out, and die at once when an operator is disabled. Each session has its own CSRF
token, which every form carries and the server checks.

Roles, each including the one before:
- viewer: sees flow and counts, never personal data (not even masked);
- officer: sees masked personal data, reveals it with a recorded reason, acts on requests;
- admin: everything an officer does, and manages operators.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from pipeline import audit
from pipeline.dashboard.models import OperatorRow, OperatorSessionRow
from pipeline.db import transaction, utcnow
from pipeline.errors import PermanentError

if TYPE_CHECKING:
    from pipeline.bootstrap import App

SESSION_LIFETIME = timedelta(hours=8)  # signed in for a working day at most
SESSION_IDLE = timedelta(minutes=30)  # and signed out after half an hour away
_TOUCH_EVERY = timedelta(minutes=1)  # write last_seen_at at most this often
MIN_PASSWORD_LENGTH = 12
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OFFICER = "officer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def includes(self, other: Role) -> bool:
        """An admin may do what an officer may, an officer what a viewer may."""
        return self.rank >= other.rank


_RANK = {Role.VIEWER: 0, Role.OFFICER: 1, Role.ADMIN: 2}


class OperatorError(PermanentError):
    """An operator could not be created, changed or signed in; the message says why."""


@dataclass(frozen=True)
class Operator:
    id: int
    name: str
    role: Role

    @property
    def sees_pii(self) -> bool:
        return self.role.includes(Role.OFFICER)


@dataclass(frozen=True)
class SignedIn:
    operator: Operator
    csrf: str


# -- passwords ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScryptCost:
    """scrypt's work factors. The default is one of OWASP's equivalent settings
    (N=2^15, r=8, p=3); each hash records its own, so the default can rise later."""

    n: int = 2**15
    r: int = 8
    p: int = 3


DEFAULT_COST = ScryptCost()


def _scrypt(password: str, salt: bytes, cost: ScryptCost) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=cost.n, r=cost.r, p=cost.p, maxmem=2**28, dklen=32
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_password(password: str, cost: ScryptCost = DEFAULT_COST) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, cost)
    return f"scrypt${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        cost = ScryptCost(int(n), int(r), int(p))
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), cost)
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@cache
def _decoy_hash() -> str:
    """Checked against when the name is unknown, so timing does not tell names apart."""
    return hash_password(secrets.token_urlsafe(16))


# -- operators ---------------------------------------------------------------------------


def _operator(row: OperatorRow) -> Operator:
    return Operator(id=row.id, name=row.name, role=Role(row.role))


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise OperatorError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


def create_operator(
    app: App,
    name: str,
    role: Role | str,
    password: str,
    *,
    actor: str,
    cost: ScryptCost = DEFAULT_COST,
) -> Operator:
    if not _NAME.match(name):
        raise OperatorError(
            "an operator name is 1 to 64 characters: lower-case letters, digits, . _ @ -"
        )
    try:
        role = Role(role)
    except ValueError as exc:
        raise OperatorError(f"role must be one of {', '.join(Role)}") from exc
    check_new_password(password)
    hashed = hash_password(password, cost)
    with transaction(app.sessions) as session:
        if session.execute(select(OperatorRow.id).where(OperatorRow.name == name)).scalar():
            raise OperatorError(f"an operator named {name!r} exists")
        row = OperatorRow(name=name, role=role.value, password_hash=hashed, created_at=utcnow())
        session.add(row)
        session.flush()
        audit.record(session, "operator_created", actor=actor, operator=name, role=role.value)
        return _operator(row)


def disable_operator(app: App, name: str, *, actor: str) -> None:
    """Disabled operators cannot sign in, and their open sessions end now."""
    with transaction(app.sessions) as session:
        row = session.execute(select(OperatorRow).where(OperatorRow.name == name)).scalar()
        if row is None:
            raise OperatorError(f"no operator named {name!r}")
        if row.disabled_at is not None:
            return
        row.disabled_at = utcnow()
        session.execute(delete(OperatorSessionRow).where(OperatorSessionRow.operator_id == row.id))
        audit.record(session, "operator_disabled", actor=actor, operator=name)


def set_password(
    app: App, name: str, password: str, *, actor: str, cost: ScryptCost = DEFAULT_COST
) -> None:
    """A new password for an operator; their open sessions end now."""
    check_new_password(password)
    hashed = hash_password(password, cost)
    with transaction(app.sessions) as session:
        row = session.execute(select(OperatorRow).where(OperatorRow.name == name)).scalar()
        if row is None:
            raise OperatorError(f"no operator named {name!r}")
        row.password_hash = hashed
        session.execute(delete(OperatorSessionRow).where(OperatorSessionRow.operator_id == row.id))
        audit.record(session, "operator_password_set", actor=actor, operator=name)


@dataclass(frozen=True)
class OperatorListing:
    name: str
    role: str
    created_at: datetime
    disabled_at: datetime | None


def list_operators(app: App) -> list[OperatorListing]:
    with app.sessions() as session:
        rows = session.execute(select(OperatorRow).order_by(OperatorRow.name)).scalars()
        return [OperatorListing(r.name, r.role, r.created_at, r.disabled_at) for r in rows]


# -- sessions ----------------------------------------------------------------------------


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(
    app: App, name: str, password: str, *, replaces: str | None = None
) -> tuple[str, SignedIn] | None:
    """Check the password and start a new session (a new token every time: a token
    planted before sign-in is worth nothing after it). None if refused."""
    with app.sessions() as session:
        row = session.execute(select(OperatorRow).where(OperatorRow.name == name)).scalar()
        stored = row.password_hash if row is not None else _decoy_hash()
        matches = check_password(password, stored)
    if row is None or not matches or row.disabled_at is not None:
        with transaction(app.sessions) as session:
            # An unknown name may be anything typed (even a person's email): not recorded.
            audit.record(session, "operator_sign_in_refused", actor=row.name if row else "unknown")
        return None
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    with transaction(app.sessions) as session:
        if replaces:
            session.execute(
                delete(OperatorSessionRow).where(
                    OperatorSessionRow.token_hash == _token_hash(replaces)
                )
            )
        session.execute(delete(OperatorSessionRow).where(OperatorSessionRow.expires_at < now))
        session.add(
            OperatorSessionRow(
                token_hash=_token_hash(token),
                operator_id=row.id,
                csrf=csrf,
                created_at=now,
                last_seen_at=now,
                expires_at=now + SESSION_LIFETIME,
            )
        )
        audit.record(session, "operator_signed_in", actor=row.name)
    return token, SignedIn(_operator(row), csrf)


def resume(app: App, token: str, *, now: datetime | None = None) -> SignedIn | None:
    """The operator behind a session cookie, or None if it expired, idled out, was
    signed out, or its operator was disabled."""
    if not token:
        return None
    now = now or utcnow()
    with app.sessions() as session:
        found = session.execute(
            select(OperatorSessionRow, OperatorRow)
            .join(OperatorRow, OperatorRow.id == OperatorSessionRow.operator_id)
            .where(OperatorSessionRow.token_hash == _token_hash(token))
        ).first()
    if found is None:
        return None
    row, operator = found
    if (
        operator.disabled_at is not None
        or now >= row.expires_at
        or now - row.last_seen_at >= SESSION_IDLE
    ):
        sign_out(app, token)
        return None
    if now - row.last_seen_at >= _TOUCH_EVERY:
        with transaction(app.sessions) as session:
            live = session.get(OperatorSessionRow, row.token_hash)
            if live is not None:
                live.last_seen_at = now
    return SignedIn(_operator(operator), row.csrf)


def sign_out(app: App, token: str) -> None:
    with transaction(app.sessions) as session:
        session.execute(
            delete(OperatorSessionRow).where(OperatorSessionRow.token_hash == _token_hash(token))
        )


def csrf_matches(expected: str, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(expected.encode(), (sent or "").encode())
