"""The access archive (R14-R18): per-store JSON, the person's files, the Art. 15 facts and
a human-readable summary, zipped and encrypted at rest.

Each store's part is written encrypted by its own task; `assemble` streams the parts
into one zip through the encrypting writer, so neither a part nor the archive is ever
held whole in memory or written in clear to disk.

On disk, per request: `<exports>/<request id>/archive.zip.enc`, and while the stores
act, `<request id>/parts/<store>.json.enc` (beside it a folder `<store>.files/` only for
a part with attached files). Each file is written under a temporary name and renamed
into place, so a reader never sees half of one. Folders are kept few: creating and
removing one costs 25 to 700 us of kernel time on the ext4 volume this runs on, as
much as the rest of writing the archive; a single folder for every request's files
instead made each file's creation several times dearer there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from jinja2 import Environment, PackageLoader, select_autoescape

from connectors.base import StoreExport, StoreMetadata, iter_chunks

if TYPE_CHECKING:
    from pipeline.bootstrap import App

RIGHTS = (
    "You may ask us to correct inaccurate data about you (GDPR Art. 16; CCPA right to correct).",
    "You may ask us to delete your data (GDPR Art. 17; CCPA right to delete).",
    "You may ask us to restrict processing (GDPR Art. 18) and receive your data in a "
    "portable form (GDPR Art. 20): this archive is that form.",
    "You may object to processing, and opt out of any further contact, at any time "
    "(GDPR Art. 21; CCPA right to opt out).",
    "You may complain to a data protection supervisory authority, such as the one where "
    "you live or work (GDPR Art. 77), or to the California Privacy Protection Agency.",
)


ARCHIVE = "archive.zip.enc"
_T = TypeVar("_T")


def archive_path(exports: Path, request_id: str) -> Path:
    return exports / request_id / ARCHIVE


def _part_file(app: App, request_id: str, store: str) -> Path:
    return app.exports_dir / request_id / "parts" / f"{store}.json.enc"


def _files_dir(part: Path) -> Path:
    """Where a part's attached files go (made only for a part that has some)."""
    if part.name == "records.json.enc":  # the layout before 2026-11-26 (`_written_part`)
        return part.with_name("files")
    return part.with_name(part.name.removesuffix(".json.enc") + ".files")


def _written_part(app: App, request_id: str, store: str) -> Path:
    """The part a store's task wrote; a part written by a worker of before 2026-11-26
    (a folder per store, `<request id>/parts/<store>/records.json.enc`) is found there,
    so requests in flight across the upgrade lose nothing."""
    part = _part_file(app, request_id, store)
    if part.exists():
        return part
    legacy = part.with_name(store) / "records.json.enc"
    return legacy if legacy.exists() else part


def _replace_with(final: Path, write: Callable[[BinaryIO], _T]) -> _T:
    """Write `final` under a temporary name beside it, then rename it into place;
    returns what `write` returned."""
    staging = final.with_name(f".{uuid.uuid4().hex}.tmp")
    try:
        with staging.open("wb") as dest:
            written = write(dest)
        os.replace(staging, final)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return written


def write_part(app: App, request_id: str, export: StoreExport) -> dict[str, int]:
    """Write one store's export, encrypted, replacing any earlier attempt."""
    ring = app.keys.ring
    part = _part_file(app, request_id, export.store)
    part.parent.mkdir(parents=True, exist_ok=True)
    files_dir = _files_dir(part)
    if files_dir.exists():  # an earlier attempt's files
        shutil.rmtree(files_dir)
    files = []
    total = 0
    for index, attachment in enumerate(export.attachments):
        files_dir.mkdir(exist_ok=True)
        with attachment.stream() as src, (files_dir / f"{index}.enc").open("wb") as dest:
            writer = ring.writer(dest)
            size = 0
            for chunk in iter_chunks(src):
                writer.write(chunk)
                size += len(chunk)
            writer.close()
        files.append({"name": attachment.name, "size": size, "part": f"{index}.enc"})
        total += size
    body = json.dumps({"records": export.records, "files": files}, default=str).encode()
    _replace_with(part, lambda dest: ring.encrypt_file([body], dest))
    rows = sum(len(v) for v in export.records.values())
    return {"records": rows, "files": len(files), "bytes": total}


def readable_json(value: Any) -> str:
    """JSON laid out for a person opening the file: a mapping one key per line, a list
    one item per line, each item compact. The same value as `json.dumps` gives, through
    json's C encoder (`indent` would switch to its pure-Python one, several times slower
    on the many small rows of an export)."""

    def lines(item: Any, depth: int) -> str:
        pad = "  " * (depth + 1)
        if isinstance(item, dict) and item and depth < 2:
            inner = ",\n".join(
                f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {lines(v, depth + 1)}"
                for k, v in item.items()
            )
            return "{\n" + inner + "\n" + "  " * depth + "}"
        if isinstance(item, list) and item:
            inner = ",\n".join(pad + _compact(v) for v in item)
            return "[\n" + inner + "\n" + "  " * depth + "]"
        return _compact(item)

    return lines(value, 0) + "\n"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))


@dataclass(frozen=True)
class BuiltArchive:
    path: Path
    size: int
    sha256: str


@functools.cache
def _env() -> Environment:
    """One environment per process: it compiles each template once, not per archive."""
    return Environment(
        loader=PackageLoader("pipeline", "templates"),
        autoescape=select_autoescape(["html"]),
        auto_reload=False,
    )


def _safe_name(name: str) -> str:
    parts = [p for p in Path(name).parts if p not in ("", ".", "..", "/")]
    return "/".join(parts) or "file"


def assemble(
    app: App, request_id: str, stores: list[str], metadata: Mapping[str, StoreMetadata]
) -> BuiltArchive:
    ring = app.keys.ring
    final = archive_path(app.exports_dir, request_id)
    parts = {store: _written_part(app, request_id, store) for store in sorted(stores)}
    if final.exists() and not final.with_name("parts").exists():
        return _built(final)  # assembled before a crash; the parts are already gone
    final.parent.mkdir(exist_ok=True)  # no part was written for a person we hold nothing on
    generated = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    facts: dict[str, Any] = {}
    summary: list[dict[str, Any]] = []

    def write(dest: BinaryIO) -> _Hashing:
        hashing = _Hashing(dest)
        writer = ring.writer(hashing)  # type: ignore[arg-type]
        with zipfile.ZipFile(writer, "w", compression=zipfile.ZIP_DEFLATED) as zf:  # type: ignore[arg-type]
            for store, part_file in parts.items():
                part = json.loads(b"".join(_decrypt(app, part_file)))
                meta = metadata.get(store)
                store_facts = {k: asdict(v) for k, v in meta.facts.items()} if meta else {}
                facts[store] = {
                    "title": meta.title if meta else store,
                    "description": meta.description if meta else "",
                    "data": store_facts,
                }
                zf.writestr(
                    f"{store}/records.json",
                    readable_json(
                        {
                            "store": store,
                            "title": facts[store]["title"],
                            "collections": part["records"],
                        }
                    ),
                )
                for entry in part["files"]:
                    src = _files_dir(part_file) / entry["part"]
                    with zf.open(
                        f"{store}/files/{_safe_name(entry['name'])}", "w", force_zip64=True
                    ) as out:
                        for chunk in _decrypt(app, src):
                            out.write(chunk)
                summary.append(
                    {
                        "store": store,
                        "title": facts[store]["title"],
                        "description": facts[store]["description"],
                        "collections": part["records"],
                        "files": part["files"],
                        "facts": store_facts,
                    }
                )
            zf.writestr(
                "facts.json",
                readable_json(
                    {
                        "request_id": request_id,
                        "generated_at": generated,
                        "stores": facts,
                        "your_rights": RIGHTS,
                    }
                ),
            )
            html = (
                _env()
                .get_template("archive_summary.html")
                .render(
                    request_id=request_id, generated_at=generated, stores=summary, rights=RIGHTS
                )
            )
            zf.writestr("summary.html", html)
            zf.writestr(
                "README.txt",
                (
                    "Your Allego data\n\n"
                    "summary.html  a readable overview of everything below\n"
                    "facts.json    why we hold it, who receives it, how long we keep it, "
                    "where it came from\n"
                    "<store>/records.json  your records in each product, machine-readable (JSON)\n"
                    "<store>/files/        your files in that product\n"
                ),
            )
        writer.close()
        return hashing

    hashed = _replace_with(final, write)
    shutil.rmtree(final.with_name("parts"), ignore_errors=True)
    return BuiltArchive(final, hashed.size, hashed.digest.hexdigest())


class _Hashing:
    """A file being written, hashed and counted on the way (so the archive is not read
    back for its digest)."""

    def __init__(self, dest: BinaryIO) -> None:
        self._dest = dest
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._dest.write(data)

    def flush(self) -> None:
        self._dest.flush()


def _built(path: Path) -> BuiltArchive:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter_chunks(f):
            digest.update(chunk)
    return BuiltArchive(path, path.stat().st_size, digest.hexdigest())


def _decrypt(app: App, path: Path) -> Iterator[bytes]:
    with path.open("rb") as src:
        yield from app.keys.ring.decrypt_file(src)


def open_archive(app: App, path: Path) -> Iterator[bytes]:
    """The decrypted archive, chunk by chunk, for the download endpoint."""
    return _decrypt(app, path)
