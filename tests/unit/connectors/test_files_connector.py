"""The files connector over the seeded media folder."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from connectors.allego.seed import DemoManifest
from connectors.base import (
    Capability,
    Connector,
    Correction,
    Identity,
    StoreUnavailable,
    UnsupportedAction,
    iter_chunks,
)


def test_media_locate_finds_the_persons_files_by_email_or_by_video_id(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    media = stores["media"]
    by_email = media.locate(dana.identity())
    assert dict(Counter(r.collection for r in by_email.records)) == dana.records["media"]
    by_id = media.locate(Identity(email="", product_ids={"video": dana.product_ids["video"]}))
    assert by_id.records == by_email.records
    assert by_email.discovered_ids == {"media": dana.product_ids["media"]}
    assert media.locate(demo.person("nobody").identity()).records == ()


def test_media_locate_ignores_ids_that_would_leave_the_root(
    stores: dict[str, Connector],
) -> None:
    assert stores["media"].locate(Identity(email="", product_ids={"media": ".."})).records == ()


def test_media_export_streams_the_files_with_a_listing(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    export = stores["media"].export(dana.identity())
    folder = Path(demo.stores["media"]) / dana.product_ids["media"]
    assert len(export.attachments) == 6
    for attachment in export.attachments:
        with attachment.stream() as stream:
            content = b"".join(iter_chunks(stream, 100))
        assert content == (folder / attachment.name).read_bytes()
        assert attachment.size == len(content)
    names = {v["name"] for v in export.records["videos"]}
    assert names == {a.name.split("/")[-1] for a in export.attachments if a.name.endswith(".mp4")}
    assert export.records["profile"] == [
        {"user_id": dana.product_ids["media"], "email": dana.email}
    ]


def test_media_erase_removes_the_folder_once(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana, twin = demo.person("dana"), demo.person("dana_lookalike")
    media = stores["media"]
    assert media.erase(dana.identity()).deleted == 7
    assert media.erase(dana.identity()).deleted == 0
    assert media.locate(dana.identity(with_ids=True)).records == ()
    assert len(media.locate(twin.identity()).records) == sum(twin.records["media"].values())


def test_media_declares_neither_correct_nor_opt_out(stores: dict[str, Connector]) -> None:
    media = stores["media"]
    assert media.capabilities == {Capability.LOCATE, Capability.EXPORT, Capability.ERASE}
    with pytest.raises(UnsupportedAction):
        media.opt_out(Identity("a@example.com"))
    with pytest.raises(UnsupportedAction):
        media.correct(Identity("a@example.com"), (Correction("name", "A"),))


def test_a_missing_media_root_is_unavailable_not_empty(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    shutil.rmtree(demo.stores["media"])
    with pytest.raises(StoreUnavailable):
        stores["media"].locate(demo.person("dana").identity())
    assert stores["media"].health().ok is False
