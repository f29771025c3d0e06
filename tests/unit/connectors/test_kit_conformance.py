"""The conformance kit over every connector in the repo: memory, files, and the SQL
connector for each of the five Allego SQL stores (SQLite here; PostgreSQL in
tests/integration/connectors/test_kit_on_postgres.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from connectors.allego.seed import ALLEGO_DIR, SQL_STORES, seed_demo_stores, sqlite_path
from connectors.base import Capability
from connectors.files import FilesConnector
from connectors.sql import SqlConnector, SqlMapping
from connectors.testing import ConnectorContract, Scenario
from tests.unit.connectors.kit_seeds import memory_scenario, seeded_memory

DEMO_PEOPLE = 60


class TestMemoryConnector(ConnectorContract):
    def make_scenario(self, tmp_path: Path) -> Scenario:
        return memory_scenario(seeded_memory())


class TestReadOnlyMemoryConnector(ConnectorContract):
    """A store that declares only locate and export: the kit checks the rest is refused."""

    def make_scenario(self, tmp_path: Path) -> Scenario:
        store = seeded_memory(capabilities={Capability.LOCATE, Capability.EXPORT})
        return memory_scenario(store)


class TestFilesConnector(ConnectorContract):
    def make_scenario(self, tmp_path: Path) -> Scenario:
        demo = seed_demo_stores(tmp_path, people=DEMO_PEOPLE, seed=7)
        dana, twin = demo.person("dana"), demo.person("dana_lookalike")
        connector = FilesConnector.from_config(
            "media",
            {"root": demo.stores["media"], "mapping": str(ALLEGO_DIR / "media.toml")},
            tmp_path,
        )
        return Scenario(
            connector=connector,
            person=dana.identity(),
            lookalike=twin.identity(),
            expected_counts=dana.records["media"],
            lookalike_markers=(twin.product_ids["media"],),
        )


def secret_values(db: Path, mapping: SqlMapping) -> tuple[str, ...]:
    """Every value of every secret column in the store (long enough to be unambiguous)."""
    found: set[str] = set()
    with sqlite3.connect(db) as conn:
        for table in mapping.tables.values():
            for column in table.secret:
                for (value,) in conn.execute(f'SELECT "{column}" FROM "{table.name}"'):
                    if value is not None and len(str(value)) >= 8:
                        found.add(str(value))
    return tuple(sorted(found))


def seed_lookalike(db: Path, mapping: SqlMapping, email: str, twin_email: str) -> None:
    """Stores the demo's look-alike is not in get one: a copy of the person's profile
    row under the look-alike's email (same name), so the scoping checks mean something."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        for table in mapping.tables.values():
            if not table.email_column:
                continue
            row = conn.execute(
                f'SELECT * FROM "{table.name}" WHERE lower("{table.email_column}") = ? LIMIT 1',
                (email,),
            ).fetchone()
            if row is None:
                continue
            copy = dict(row)
            pk = copy[table.primary_key]
            copy[table.primary_key] = pk + 100000 if isinstance(pk, int) else f"{pk}-twin"
            copy[table.email_column] = twin_email
            columns = ", ".join(f'"{c}"' for c in copy)
            marks = ", ".join("?" for _ in copy)
            conn.execute(
                f'INSERT INTO "{table.name}" ({columns}) VALUES ({marks})', list(copy.values())
            )


@pytest.mark.parametrize("store", SQL_STORES)
class TestAllegoSqlStores(ConnectorContract):
    @pytest.fixture
    def scenario(self, tmp_path: Path, store: str):
        demo = seed_demo_stores(tmp_path, people=DEMO_PEOPLE, seed=7)
        dana, twin = demo.person("dana"), demo.person("dana_lookalike")
        mapping = SqlMapping.load(ALLEGO_DIR / f"{store}.toml", store=store)
        db = sqlite_path(tmp_path, store)
        connector = SqlConnector(store, mapping, f"sqlite:///{db}", batch_size=3)
        if store not in twin.records:
            seed_lookalike(db, mapping, dana.email, twin.email)
        secrets = secret_values(db, mapping)
        if store in ("video", "coaching", "billing"):
            assert secrets, "the store seeds secrets: the check must have some to look for"
        built = Scenario(
            connector=connector,
            person=dana.identity(),
            lookalike=twin.identity(),
            expected_counts=dana.records[store],
            secret_values=secrets,
            secret_fields=tuple(sorted({c for t in mapping.tables.values() for c in t.secret})),
            retains=store == "billing",
        )
        yield built
        connector.close()
