"""The access archive (R14-R18): per-store JSON, the person's files, the Art. 15 facts and
a human-readable summary, zipped and encrypted at rest.

Each store's part is written encrypted by its own task; `assemble` streams the parts
into one zip through the encrypting writer, so neither a part nor the archive is ever
held whole in memory or written in clear to disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def _part_dir(app: App, request_id: str, store: str) -> Path:
    return app.exports_dir / request_id / "parts" / store


def write_part(app: App, request_id: str, export: StoreExport) -> dict[str, int]:
    """Write one store's export, encrypted, replacing any earlier attempt."""
    ring = app.keys.ring
    final = _part_dir(app, request_id, export.store)
    staging = final.with_name(f".{export.store}.{uuid.uuid4().hex}")
    (staging / "files").mkdir(parents=True)
    files = []
    total = 0
    for index, attachment in enumerate(export.attachments):
        with attachment.stream() as src, (staging / "files" / f"{index}.enc").open("wb") as dest:
            writer = ring.writer(dest)
            size = 0
            for chunk in iter_chunks(src):
                writer.write(chunk)
                size += len(chunk)
            writer.close()
        files.append({"name": attachment.name, "size": size, "part": f"{index}.enc"})
        total += size
    body = json.dumps({"records": export.records, "files": files}, default=str).encode()
    with (staging / "records.json.enc").open("wb") as dest:
        ring.encrypt_file([body], dest)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    rows = sum(len(v) for v in export.records.values())
    return {"records": rows, "files": len(files), "bytes": total}


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
    root = app.exports_dir / request_id
    final = root / "archive.zip.enc"
    staging = root / f".archive.{uuid.uuid4().hex}"
    if final.exists() and not (root / "parts").exists():
        return _built(final)  # assembled before a crash; the parts are already gone
    root.mkdir(parents=True, exist_ok=True)  # no part was written for a person we hold nothing on
    generated = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    facts: dict[str, Any] = {}
    summary: list[dict[str, Any]] = []
    with staging.open("wb") as dest:
        writer = ring.writer(dest)
        with zipfile.ZipFile(writer, "w", compression=zipfile.ZIP_DEFLATED) as zf:  # type: ignore[arg-type]
            for store in sorted(stores):
                part = json.loads(
                    b"".join(_decrypt(app, _part_dir(app, request_id, store) / "records.json.enc"))
                )
                meta = metadata.get(store)
                store_facts = {k: asdict(v) for k, v in meta.facts.items()} if meta else {}
                facts[store] = {
                    "title": meta.title if meta else store,
                    "description": meta.description if meta else "",
                    "data": store_facts,
                }
                zf.writestr(
                    f"{store}/records.json",
                    json.dumps(
                        {
                            "store": store,
                            "title": facts[store]["title"],
                            "collections": part["records"],
                        },
                        indent=2,
                        ensure_ascii=False,
                        default=str,
                    ),
                )
                for entry in part["files"]:
                    src = _part_dir(app, request_id, store) / "files" / entry["part"]
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
                json.dumps(
                    {
                        "request_id": request_id,
                        "generated_at": generated,
                        "stores": facts,
                        "your_rights": RIGHTS,
                    },
                    indent=2,
                    ensure_ascii=False,
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
    staging.replace(final)
    shutil.rmtree(root / "parts", ignore_errors=True)
    return _built(final)


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
