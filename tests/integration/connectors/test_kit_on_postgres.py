"""The conformance kit over the five Allego SQL stores on a real PostgreSQL server."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from connectors.allego.seed import (
    ALLEGO_DIR,
    SQL_STORES,
    DemoData,
    generate_demo_data,
    write_sql_store,
)
from connectors.sql import SqlConnector, SqlMapping
from connectors.testing import ConnectorContract, Scenario

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def demo_data() -> DemoData:
    return generate_demo_data(people=40, seed=7)


def with_lookalike(rows: dict[str, list[dict]], mapping: SqlMapping, email: str, twin: str) -> None:
    """Give the look-alike a profile row (same name, other email) where the demo has none."""
    for table in mapping.tables.values():
        if not table.email_column:
            continue
        mine = [r for r in rows.get(table.name, []) if r[table.email_column].lower() == email]
        if mine:
            copy_row = dict(mine[0])
            pk = copy_row[table.primary_key]
            copy_row[table.primary_key] = pk + 100000 if isinstance(pk, int) else f"{pk}-twin"
            copy_row[table.email_column] = twin
            rows[table.name].append(copy_row)


@pytest.mark.parametrize("store", SQL_STORES)
class TestAllegoSqlStoresOnPostgres(ConnectorContract):
    @pytest.fixture
    def scenario(self, store: str, demo_data: DemoData) -> Iterator[Scenario]:
        dana, twin = demo_data.people["dana"], demo_data.people["dana_lookalike"]
        mapping = SqlMapping.load(ALLEGO_DIR / f"{store}.toml", store=store)
        rows = copy.deepcopy(demo_data.sql[store])
        if store not in twin.records:
            with_lookalike(rows, mapping, dana.email, twin.email)
        schema = f"kit_{uuid.uuid4().hex[:10]}_{store}"
        admin = sa.create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        connector = SqlConnector(store, mapping, PG_URL, schema=schema, batch_size=3)
        try:
            write_sql_store(admin, store, rows, schema=schema)
            secrets = tuple(
                sorted(
                    {
                        str(r[c])
                        for t in mapping.tables.values()
                        for c in t.secret
                        for r in rows.get(t.name, [])
                        if r.get(c) is not None and len(str(r[c])) >= 8
                    }
                )
            )
            yield Scenario(
                connector=connector,
                person=dana.identity(),
                lookalike=twin.identity(),
                expected_counts=dana.records[store],
                secret_values=secrets,
                secret_fields=tuple(sorted({c for t in mapping.tables.values() for c in t.secret})),
                retains=store == "billing",
            )
        finally:
            connector.close()
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()
