"""The same Allego mappings on real PostgreSQL and MariaDB servers.

Each store is written into its own, uniquely named schema (a database on MariaDB),
dropped afterwards, so runs never collide with each other or with other data.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors.allego.seed import SQL_STORES, DemoData, generate_demo_data, write_sql_store
from connectors.base import Correction, Identity, StoreUnavailable
from connectors.sql import REDACTED, SqlConnector, SqlMapping
from tests.integration.connectors.servers import admin_engine

ALLEGO = Path(__file__).resolve().parents[3] / "connectors" / "allego"
SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root:@127.0.0.1:3306/test",
}

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def data() -> DemoData:
    return generate_demo_data(people=40, seed=7)


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, data: DemoData) -> Iterator[dict[str, SqlConnector]]:
    url = SERVERS[request.param]
    admin = admin_engine(request.param, url)
    prefix = f"ap_{uuid.uuid4().hex[:10]}"
    schemas = {store: f"{prefix}_{store}" for store in SQL_STORES}
    quote = admin.dialect.identifier_preparer.quote
    connectors: dict[str, SqlConnector] = {}
    try:
        for store, schema in schemas.items():
            with admin.begin() as conn:
                keyword = "DATABASE" if request.param == "mariadb" else "SCHEMA"
                conn.execute(sa.text(f"CREATE {keyword} {quote(schema)}"))
            write_sql_store(admin, store, data.sql[store], schema=schema)
            mapping = SqlMapping.load(ALLEGO / f"{store}.toml", store=store)
            connectors[store] = SqlConnector(store, mapping, url, schema=schema, batch_size=7)
        yield connectors
    finally:
        for connector in connectors.values():
            connector.close()
        with admin.begin() as conn:
            for schema in schemas.values():
                if request.param == "mariadb":
                    conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quote(schema)}"))
                else:
                    conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quote(schema)} CASCADE"))
        admin.dispose()


def test_locate_finds_the_demo_person_and_not_the_look_alike(
    server: dict[str, SqlConnector], data: DemoData
) -> None:
    dana, twin = data.people["dana"], data.people["dana_lookalike"]
    for store, connector in server.items():
        found = connector.locate(dana.identity())
        assert dict(Counter(r.collection for r in found.records)) == dana.records[store]
        assert dict(
            Counter(r.collection for r in connector.locate(twin.identity()).records)
        ) == twin.records.get(store, {})
    sam = server["learning"].locate(Identity(email=" SAM.okafor@EXAMPLE.com"))
    assert (
        dict(Counter(r.collection for r in sam.records)) == data.people["sam"].records["learning"]
    )


def test_export_redacts_others_and_omits_secrets(
    server: dict[str, SqlConnector], data: DemoData
) -> None:
    dana = data.people["dana"].identity()
    feedback = server["coaching"].export(dana).records["feedback"]
    assert {f["reviewer_id"] for f in feedback} == {REDACTED}
    invoices = server["billing"].export(dana).records["invoices"]
    assert invoices and all("card_number" not in i for i in invoices)
    assert all(isinstance(i["amount"], str) for i in invoices)


def test_correct_erase_and_opt_out_behave_as_on_sqlite(
    server: dict[str, SqlConnector], data: DemoData
) -> None:
    dana = data.people["dana"]
    identity = dana.identity(with_ids=True)
    changed = server["video"].correct(identity, (Correction("phone", "+44 20 7946 0000"),))
    assert [c.after for c in changed.applied] == ["+44 20 7946 0000"]
    assert server["video"].export(identity).records["users"][0]["phone"] == "+44 20 7946 0000"
    assert server["marketing"].opt_out(identity).updated == 4
    assert server["marketing"].opt_out(identity).updated == 0

    for store, connector in server.items():
        first = connector.erase(identity)
        if store != "billing":
            assert first.deleted == sum(dana.records[store].values())
        second = connector.erase(identity)
        assert (second.deleted, second.anonymized) == (0, 0)
        assert connector.locate(identity).erasable == ()
    assert [r.count for r in server["billing"].erase(identity).retained] == [3]


def test_an_unreachable_server_raises_store_unavailable() -> None:
    mapping = SqlMapping.load(ALLEGO / "video.toml", store="video")
    dead = SqlConnector(
        "video",
        mapping,
        "postgresql+psycopg://postgres@127.0.0.1:1/test",
        engine_options={"connect_args": {"connect_timeout": 2}},
    )
    with pytest.raises(StoreUnavailable):
        dead.locate(Identity("someone@example.com"))
    assert dead.health().ok is False
