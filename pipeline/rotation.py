"""Key rotation without downtime (R30).

1. `rotate` adds a new data key to the keys file and makes it active. Running processes
   notice the file changed (`KeySource`) and encrypt with it from then on; every key
   still in the ring keeps decrypting.
2. `reencrypt` rewrites, in small batches while requests keep flowing, every field and
   archive still under another key. Each row is updated only if its ciphertext is still
   the one read (compare and swap), so a stage that wrote meanwhile is never undone.
3. `retire` removes an old key from the file, and refuses while anything still uses it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select, update

from pipeline.crypto import KeyRing, Keys, write_keys_file
from pipeline.db import Base, CaseRow, ExportRow, NotificationRow, RequestRow, StoreTaskRow
from pipeline.errors import ConfigurationError, PermanentError

if TYPE_CHECKING:
    from pipeline.bootstrap import App

log = structlog.get_logger()


@dataclass(frozen=True)
class Sealed:
    """A table's encrypted columns, and the column whose value is their context."""

    model: type[Base]
    columns: tuple[str, ...]
    context: str


SEALED = (
    Sealed(RequestRow, ("subject_enc", "payload_enc"), "id"),
    Sealed(StoreTaskRow, ("detail_enc",), "request_id"),
    Sealed(NotificationRow, ("recipient_enc", "context_enc"), "id"),
    Sealed(CaseRow, ("message_enc", "reply_enc"), "id"),
)


class KeyInUse(PermanentError):
    """A key cannot be retired while ciphertexts still need it."""


def _keys_path(app: App) -> Path:
    path = app.key_source.path
    if path is None:
        raise ConfigurationError(
            "keys come from PRIVACY_KEYS_JSON: rotate by deploying a new value with both keys"
        )
    return path


def rotate(app: App) -> str:
    """Add a fresh data key and make it active; returns its id."""
    path = _keys_path(app)
    keys = app.keys
    ids = set(keys.ring.key_ids)
    number = len(ids) + 1
    while f"k{number}" in ids:
        number += 1
    new_id = f"k{number}"
    ring = KeyRing({**keys.ring.keys, new_id: os.urandom(32)}, new_id)
    write_keys_file(path, Keys(ring, keys.index_key, keys.signing_key, keys.intake_keys, keys.demo))
    log.info("key_rotated", key_id=new_id)
    return new_id


def _rows(app: App, sealed: Sealed, batch: int) -> Iterator[list[Any]]:
    pk = sealed.model.__mapper__.primary_key[0]
    cols = [getattr(sealed.model, c) for c in (pk.name, sealed.context, *sealed.columns)]
    last: Any = None
    while True:
        with app.sessions() as session:
            query = select(*cols).order_by(pk).limit(batch)
            if last is not None:
                query = query.where(pk > last)
            rows = [list(r) for r in session.execute(query)]
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def _archives(app: App) -> list[tuple[str, Path]]:
    with app.sessions() as session:
        return [(e.id, Path(e.path)) for e in session.execute(select(ExportRow)).scalars()]


def _archive_key(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return KeyRing.stream_key_id(f)
    except FileNotFoundError:
        return None


def usage(app: App, *, batch: int = 500) -> Counter[str]:
    """How many ciphertexts (fields and archives) each key id still protects."""
    ring = app.keys.ring
    counts: Counter[str] = Counter()
    for sealed in SEALED:
        for rows in _rows(app, sealed, batch):
            for row in rows:
                counts.update(ring.key_id_of(blob) for blob in row[2:] if blob is not None)
    for _, path in _archives(app):
        kid = _archive_key(path)
        if kid is not None:
            counts[kid] += 1
    return counts


def reencrypt(app: App, *, batch: int = 200) -> int:
    """Move every ciphertext under another key to the active one; returns how many moved."""
    moved = 0
    for sealed in SEALED:
        pk = sealed.model.__mapper__.primary_key[0]
        for rows in _rows(app, sealed, batch):
            ring = app.keys.ring  # a rotation may happen meanwhile: follow it
            with app.sessions.begin() as session:
                for row in rows:
                    key, context = row[0], str(row[1]).encode()
                    for name, blob in zip(sealed.columns, row[2:], strict=True):
                        if blob is None or ring.key_id_of(blob) == ring.active:
                            continue
                        fresh = ring.encrypt(ring.decrypt(blob, context=context), context=context)
                        column = getattr(sealed.model, name)
                        result = session.execute(
                            update(sealed.model)
                            .where(pk == key, column == blob)
                            .values({name: fresh})
                        )
                        moved += result.rowcount  # type: ignore[attr-defined]
    for export_id, path in _archives(app):
        moved += _reencrypt_archive(app, export_id, path)
    log.info("keys_reencrypted", moved=moved)
    return moved


def _reencrypt_archive(app: App, export_id: str, path: Path) -> int:
    ring = app.keys.ring
    kid = _archive_key(path)
    if kid is None or kid == ring.active:
        return 0
    staging = path.with_name(f".{path.name}.{os.urandom(4).hex()}")
    with path.open("rb") as src, staging.open("wb") as dest:
        ring.encrypt_file(ring.decrypt_file(src), dest)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    os.replace(staging, path)
    with app.sessions.begin() as session:
        session.execute(
            update(ExportRow)
            .where(ExportRow.id == export_id)
            .values(size=path.stat().st_size, sha256=digest)
        )
    return 1


def retire(app: App, key_id: str) -> None:
    """Remove a key from the ring, only once nothing uses it."""
    path = _keys_path(app)
    keys = app.keys
    if key_id == keys.ring.active:
        raise KeyInUse(f"key {key_id!r} is the active key: rotate first")
    if key_id not in keys.ring.key_ids:
        raise KeyInUse(f"no key {key_id!r} in the ring")
    still = usage(app)[key_id]
    if still:
        raise KeyInUse(
            f"key {key_id!r} still protects {still} ciphertext(s): "
            "run `privacy keys reencrypt` first"
        )
    remaining = {k: v for k, v in keys.ring.keys.items() if k != key_id}
    write_keys_file(
        path,
        Keys(
            KeyRing(remaining, keys.ring.active),
            keys.index_key,
            keys.signing_key,
            keys.intake_keys,
            keys.demo,
        ),
    )
    log.info("key_retired", key_id=key_id)
