"""Loading, validating and closing the configured stores; and the demo seed itself."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from connectors.allego.seed import SQL_STORES, seed_demo_stores, sqlite_path
from connectors.base import Capability, Connector, Identity, MappingError
from connectors.files import FilesConnector
from connectors.memory import MemoryConnector
from connectors.registry import close_all, load_connectors
from connectors.sql import SqlConnector


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stores.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_config_loads_all_six_allego_stores_without_connecting(
    tmp_path: Path,
) -> None:
    stores = load_connectors(None, tmp_path)  # nothing seeded: loading must not touch stores
    assert sorted(stores) == ["billing", "coaching", "learning", "marketing", "media", "video"]
    assert isinstance(stores["video"], SqlConnector)
    assert isinstance(stores["media"], FilesConnector)
    video = stores["video"]
    assert isinstance(video, SqlConnector)
    assert video.url == f"sqlite:///{tmp_path}/stores/video.db"
    assert video.mapping.source.endswith("connectors/allego/video.toml")
    assert not (tmp_path / "stores").exists()
    close_all(stores)


def test_an_unknown_plugin_is_refused_naming_the_store_and_the_plugins(tmp_path: Path) -> None:
    config = write(tmp_path, '[stores.crm]\nconnector = "salesforce"\n')
    with pytest.raises(
        MappingError, match=r"store 'crm'.*'salesforce'.*\['files', 'http', 'memory', 'sql'\]"
    ):
        load_connectors(config, tmp_path)


def test_a_store_without_facts_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text('[store]\ntitle = "t"\n', encoding="utf-8")
    config = write(
        tmp_path, '[stores.clips]\nconnector = "files"\nroot = "{data_dir}"\nmapping = "m.toml"\n'
    )
    with pytest.raises(MappingError, match=r"store 'clips' \(connector plugin 'files'\).*facts"):
        load_connectors(config, tmp_path)


def test_a_connector_with_an_empty_fact_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(
        '[store]\ntitle = "t"\n[facts.videos]\npurpose = "p"\ncategories = []\n'
        'recipients = ["r"]\nretention = "r"\nsource = "s"\n',
        encoding="utf-8",
    )
    config = write(
        tmp_path, '[stores.clips]\nconnector = "files"\nroot = "{data_dir}"\nmapping = "m.toml"\n'
    )
    with pytest.raises(MappingError, match=r"store 'clips'.*'videos' leave `categories` empty"):
        load_connectors(config, tmp_path)


def test_memory_stores_are_configured_inline_with_data_dir_substituted(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        '[stores.crm]\nconnector = "memory"\ntitle = "CRM at {data_dir}"\n'
        '[[stores.crm.people]]\nid = "1"\nemail = "a@example.com"\n',
    )
    stores = load_connectors(config, tmp_path)
    crm = stores["crm"]
    assert isinstance(crm, MemoryConnector)
    assert crm.metadata.title == f"CRM at {tmp_path}"
    assert [r.key for r in crm.locate(Identity("A@example.com")).records] == ["1"]
    assert crm.capabilities == frozenset(Capability)


def test_close_all_closes_every_store_even_when_one_fails(tmp_path: Path) -> None:
    class Broken(MemoryConnector):
        def close(self) -> None:
            raise RuntimeError("boom")

    good = MemoryConnector("good")
    stores: dict[str, Connector] = {"broken": Broken("broken"), "good": good}
    close_all(stores)
    assert good.closed


def test_seeding_is_deterministic_and_starts_from_scratch(tmp_path: Path) -> None:
    first = seed_demo_stores(tmp_path / "a", people=30, seed=3)
    with sqlite3.connect(sqlite_path(tmp_path / "a", "video")) as conn:
        conn.execute("DELETE FROM comments")
    again = seed_demo_stores(tmp_path / "a", people=30, seed=3)
    other = seed_demo_stores(tmp_path / "b", people=30, seed=3)
    assert first.people == again.people == other.people

    def dump(root: Path, store: str) -> list[Any]:
        with sqlite3.connect(sqlite_path(root, store)) as conn:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            return [
                conn.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall() for t in sorted(tables)
            ]

    for store in SQL_STORES:
        assert dump(tmp_path / "a", store) == dump(tmp_path / "b", store)
    manifest = json.loads((tmp_path / "a" / "stores" / "manifest.json").read_text())
    assert manifest["people"]["dana"]["product_ids"]["video"] == "v-10042"


def test_the_manifest_covers_the_promised_demo_people(tmp_path: Path) -> None:
    demo = seed_demo_stores(tmp_path, people=30)
    dana, sam = demo.person("dana"), demo.person("sam")
    assert set(dana.records) == {*SQL_STORES, "media"}
    assert dana.records["billing"]["invoices"] > 0 and dana.records["media"]["videos"] > 0
    assert set(sam.records) < set(dana.records)
    assert demo.person("dana_lookalike").name == dana.name
    assert demo.person("dana_lookalike").email != dana.email
    assert demo.person("nobody").records == {}
