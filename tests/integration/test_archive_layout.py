"""The access archive on disk: few folders, nothing left behind, the same content as the
person's data, and parts written by an older worker still found."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from connectors.base import Attachment, StoreExport
from pipeline import archive
from pipeline.crypto import DecryptionFailed
from tests.conftest import make_app

ROWS = {
    "orders": [{"id": i, "total": f"{i}.50", "note": "café ✓"} for i in range(1, 4)],
    "profile": [{"id": 7, "email": "dana@example.org"}],
}


@pytest.fixture
def app(state_url, tmp_path):
    application = make_app(state_url, tmp_path / "data")
    yield application
    application.close()


def opened(app, path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(b"".join(archive.open_archive(app, path))))


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_an_archive_is_one_encrypted_file_and_its_parts_are_gone(app):
    attachment = Attachment("videos/v1.mp4", 5, lambda: io.BytesIO(b"video"))
    archive.write_part(app, "r-1", StoreExport("shop", ROWS))
    archive.write_part(app, "r-1", StoreExport("media", {"videos": []}, (attachment,)))
    exports = app.exports_dir
    assert everything_under(exports) == [
        "r-1",
        "r-1/parts",
        "r-1/parts/media.files",
        "r-1/parts/media.files/0.enc",
        "r-1/parts/media.json.enc",
        "r-1/parts/shop.json.enc",
    ]

    built = archive.assemble(app, "r-1", ["shop", "media"], {})

    assert built.path == archive.archive_path(exports, "r-1")
    assert everything_under(exports) == ["r-1", "r-1/archive.zip.enc"]
    data = built.path.read_bytes()
    assert data[:2] != b"PK" and b"dana@example.org" not in data  # encrypted at rest
    assert (built.size, built.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    with opened(app, built.path) as zf:
        shop = json.loads(zf.read("shop/records.json"))
        assert shop == {"store": "shop", "title": "shop", "collections": ROWS}
        assert zf.read("media/files/videos/v1.mp4") == b"video"
        facts = json.loads(zf.read("facts.json"))
        assert facts["request_id"] == "r-1" and len(facts["your_rights"]) == 5
        assert "summary.html" in zf.namelist()


def test_a_rewritten_part_replaces_the_earlier_attempt_and_its_files(app):
    attachment = Attachment("a.txt", 1, lambda: io.BytesIO(b"a"))
    archive.write_part(app, "r-2", StoreExport("media", {"videos": []}, (attachment, attachment)))
    archive.write_part(app, "r-2", StoreExport("media", {"videos": [{"id": 1}]}))
    assert everything_under(app.exports_dir) == ["r-2", "r-2/parts", "r-2/parts/media.json.enc"]
    with opened(app, archive.assemble(app, "r-2", ["media"], {}).path) as zf:
        assert json.loads(zf.read("media/records.json"))["collections"] == {"videos": [{"id": 1}]}
        assert not [n for n in zf.namelist() if n.startswith("media/files/")]


def test_assembling_again_after_a_crash_returns_the_archive_built(app):
    archive.write_part(app, "r-3", StoreExport("shop", ROWS))
    first = archive.assemble(app, "r-3", ["shop"], {})
    again = archive.assemble(app, "r-3", ["shop"], {})  # the parts are gone: nothing to redo
    assert again == first


def test_a_part_written_in_the_folder_layout_of_before_is_still_assembled(app):
    """A worker of before 2026-11-26 wrote `<request>/parts/<store>/records.json.enc`;
    a request in flight across the upgrade keeps its data."""
    legacy = app.exports_dir / "r-4" / "parts" / "shop"
    (legacy / "files").mkdir(parents=True)
    (legacy / "files" / "0.enc").write_bytes(b"")
    with (legacy / "files" / "0.enc").open("wb") as dest:
        app.keys.ring.encrypt_file([b"receipt"], dest)
    body = json.dumps({"records": ROWS, "files": [{"name": "r.pdf", "size": 7, "part": "0.enc"}]})
    with (legacy / "records.json.enc").open("wb") as dest:
        app.keys.ring.encrypt_file([body.encode()], dest)

    built = archive.assemble(app, "r-4", ["shop"], {})

    with opened(app, built.path) as zf:
        assert json.loads(zf.read("shop/records.json"))["collections"] == ROWS
        assert zf.read("shop/files/r.pdf") == b"receipt"
    assert not (app.exports_dir / "r-4" / "parts").exists()


def test_a_missing_part_fails_the_assembly_instead_of_leaving_a_store_out(app):
    archive.write_part(app, "r-5", StoreExport("shop", ROWS))
    with pytest.raises(FileNotFoundError):
        archive.assemble(app, "r-5", ["shop", "crm"], {})
    assert not archive.archive_path(app.exports_dir, "r-5").exists()
    assert everything_under(app.exports_dir) == ["r-5", "r-5/parts", "r-5/parts/shop.json.enc"]


def test_readable_json_is_the_same_value_one_record_per_line():
    value = {"store": "s", "collections": ROWS, "empty": {}, "none": [], "n": None}
    text = archive.readable_json(value)
    assert json.loads(text) == value
    assert '    "orders": [\n      {"id": 1, "total": "1.50", "note": "café ✓"},' in text


def test_an_archive_from_another_key_ring_does_not_open(app, tmp_path):
    archive.write_part(app, "r-6", StoreExport("shop", ROWS))
    built = archive.assemble(app, "r-6", ["shop"], {})
    other = make_app(app.settings.database_url, tmp_path / "other")
    try:
        with pytest.raises(DecryptionFailed):
            b"".join(archive.open_archive(other, built.path))
    finally:
        other.close()
