"""Files connector: media kept on disk, one folder per person.

Layout under `root`::

    <video user id>/owner.json        {"user_id": "v-10042", "email": "..."}
    <video user id>/videos/*.mp4
    <video user id>/transcripts/*.txt

Files are exported as streamed attachments (never read whole: videos are large), and
erasure removes the person's folder. The store holds no editable personal fields and
no contact preference, so it declares neither `correct` nor `opt_out`.

The mapping file (TOML) holds the store's title, description and Art. 15 facts::

    [store]
    title = "Media files"
    description = "..."
    [facts.videos]
    purpose = "..."  # and categories, recipients, retention, source
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from connectors.base import (
    Attachment,
    Capability,
    Correction,
    CorrectionResult,
    DataFacts,
    ErasureResult,
    Health,
    Identity,
    LocateResult,
    MappingError,
    OptOutResult,
    RecordRef,
    StoreExport,
    StoreMetadata,
    StoreUnavailable,
    UnsupportedAction,
)

log = structlog.get_logger()

OWNER_FILE = "owner.json"
COLLECTIONS = ("videos", "transcripts")
PROFILE = "profile"


def _safe_folder_name(value: str) -> bool:
    """An id may name a folder only if it cannot climb out of the root."""
    return bool(value) and value not in (".", "..") and "/" not in value and "\\" not in value


class FilesConnector:
    """A folder of per-person media, found by email in `owner.json` or by user id."""

    capabilities = frozenset({Capability.LOCATE, Capability.EXPORT, Capability.ERASE})
    correctable_fields: frozenset[str] = frozenset()

    def __init__(
        self,
        name: str,
        root: Path,
        metadata: StoreMetadata,
        *,
        id_stores: tuple[str, ...] = ("media", "video"),
    ) -> None:
        self.name = name
        self.root = Path(root)
        self.metadata = metadata
        self.id_stores = tuple(dict.fromkeys((name, *id_stores)))

    @classmethod
    def from_config(cls, name: str, settings: Mapping[str, Any], data_dir: Path) -> FilesConnector:
        root = settings.get("root")
        if not isinstance(root, str | Path) or not str(root):
            raise MappingError(f"store {name!r}: `root` is missing; set the media folder path")
        source: Mapping[str, Any] = settings
        mapping = settings.get("mapping")
        if mapping is not None:
            try:
                source = tomllib.loads(Path(mapping).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise MappingError(
                    f"store {name!r}: mapping {mapping} cannot be read ({type(exc).__name__}); "
                    "fix the `mapping` path or its TOML"
                ) from exc
        store = dict(source.get("store", {}))
        facts_raw = source.get("facts")
        if not isinstance(facts_raw, Mapping) or not facts_raw:
            raise MappingError(
                f"store {name!r}: no Art. 15 facts are declared; add [facts.videos] and "
                "[facts.transcripts] with purpose, categories, recipients, retention, source"
            )
        facts: dict[str, DataFacts] = {}
        for collection, raw in facts_raw.items():
            try:
                facts[collection] = DataFacts(
                    purpose=str(raw["purpose"]),
                    categories=tuple(raw["categories"]),
                    recipients=tuple(raw["recipients"]),
                    retention=str(raw["retention"]),
                    source=str(raw["source"]),
                    automated_decisions=str(raw.get("automated_decisions", "none")),
                )
            except (KeyError, TypeError) as exc:
                raise MappingError(
                    f"store {name!r}: facts of {collection!r} lack {exc}; add it"
                ) from exc
        metadata = StoreMetadata(
            name=name,
            title=str(store.get("title", name)),
            description=str(store.get("description", "")),
            facts=facts,
            field_categories={f"{c}.file": "media" for c in facts},
        )
        id_stores = tuple(settings.get("id_stores", ("media", "video")))
        return cls(name, Path(root), metadata, id_stores=id_stores)

    # ------------------------------------------------------------- plumbing

    def _check_root(self) -> None:
        """A missing root is an unmounted volume, never "this person has no files" (R12)."""
        if not self.root.is_dir():
            raise StoreUnavailable(f"store {self.name!r}: media root is not reachable")

    def _folders(self, identity: Identity) -> list[Path]:
        self._check_root()
        folders: dict[Path, None] = {}
        try:
            for store in self.id_stores:
                user_id = identity.product_ids.get(store)
                if user_id and _safe_folder_name(user_id):
                    folder = self.root / user_id
                    if (folder / OWNER_FILE).is_file():
                        folders[folder] = None
            email = identity.email.strip().lower() if identity.email else ""
            if email:
                for folder in sorted(self.root.iterdir()):
                    owner = self._owner(folder)
                    if owner and str(owner.get("email", "")).strip().lower() == email:
                        folders[folder] = None
        except OSError as exc:
            raise StoreUnavailable(f"store {self.name!r}: media root cannot be read") from exc
        return list(folders)

    @staticmethod
    def _owner(folder: Path) -> dict[str, Any] | None:
        path = folder / OWNER_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _files(folder: Path, collection: str) -> list[Path]:
        sub = folder / collection
        return sorted(p for p in sub.iterdir() if p.is_file()) if sub.is_dir() else []

    # ------------------------------------------------------------- contract

    def locate(self, identity: Identity) -> LocateResult:
        folders = self._folders(identity)
        records: list[RecordRef] = []
        discovered: dict[str, str] = {}
        try:
            for folder in folders:
                records.append(RecordRef(PROFILE, f"{folder.name}/{OWNER_FILE}"))
                for collection in COLLECTIONS:
                    records.extend(
                        RecordRef(collection, f"{folder.name}/{collection}/{p.name}", via="folder")
                        for p in self._files(folder, collection)
                    )
                discovered.setdefault(self.name, folder.name)
        except OSError as exc:
            raise StoreUnavailable(f"store {self.name!r}: media folder cannot be read") from exc
        log.info("store_located", store=self.name, records=len(records))
        return LocateResult(self.name, tuple(records), discovered)

    def export(self, identity: Identity) -> StoreExport:
        folders = self._folders(identity)
        records: dict[str, list[dict[str, Any]]] = {}
        attachments: list[Attachment] = []
        try:
            for folder in folders:
                owner = self._owner(folder) or {}
                records.setdefault(PROFILE, []).append(
                    {"user_id": owner.get("user_id"), "email": owner.get("email")}
                )
                for collection in COLLECTIONS:
                    for path in self._files(folder, collection):
                        stat = path.stat()
                        records.setdefault(collection, []).append(
                            {
                                "name": path.name,
                                "size": stat.st_size,
                                "modified": dt.datetime.fromtimestamp(
                                    stat.st_mtime, tz=dt.UTC
                                ).isoformat(),
                            }
                        )
                        prefix = f"{folder.name}/" if len(folders) > 1 else ""
                        attachments.append(
                            Attachment(
                                name=f"{prefix}{collection}/{path.name}",
                                size=stat.st_size,
                                open=functools.partial(path.open, "rb"),
                            )
                        )
        except OSError as exc:
            raise StoreUnavailable(f"store {self.name!r}: media folder cannot be read") from exc
        log.info("store_exported", store=self.name, attachments=len(attachments))
        return StoreExport(self.name, records, tuple(attachments))

    def correct(self, identity: Identity, corrections: tuple[Correction, ...]) -> CorrectionResult:
        raise UnsupportedAction(f"store {self.name!r} holds no correctable fields")

    def erase(self, identity: Identity) -> ErasureResult:
        folders = self._folders(identity)
        deleted = 0
        try:
            for folder in folders:
                deleted += sum(1 for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder)
        except FileNotFoundError:
            pass  # removed by a concurrent run of the same erasure: the goal is met
        except OSError as exc:
            raise StoreUnavailable(f"store {self.name!r}: media folder cannot be removed") from exc
        log.info("store_erased", store=self.name, deleted=deleted)
        return ErasureResult(self.name, deleted=deleted, anonymized=0)

    def opt_out(self, identity: Identity) -> OptOutResult:
        raise UnsupportedAction(f"store {self.name!r} keeps no contact preference")

    def health(self) -> Health:
        if not self.root.is_dir():
            return Health(ok=False, detail="media root is not reachable")
        return Health(ok=True)

    def close(self) -> None:
        """Nothing to release: files are opened per attachment by the reader."""
