"""The SQL connector's batch reads on a real PostgreSQL server: each person of a batch
gets exactly what a read for them alone gives, and a batch costs the queries of one
person (the SQLite twin is tests/unit/connectors/test_sql_batch_reads.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from connectors.sql import SqlConnector
from tests.unit.connectors import batch_seeds as seeds
from tests.unit.connectors.test_sql_batch_reads import (
    assert_batch_reads_as_alone,
    batch_reads_as_alone,
    count_selects,
)

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def schema() -> Iterator[tuple[str, sa.Engine, sa.MetaData]]:
    name = f"batch_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield name, admin, seeds.create_tables(admin, schema=name)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def store(schema: tuple[str, sa.Engine, sa.MetaData]) -> Iterator[tuple[SqlConnector, Any]]:
    name, admin, md = schema
    connector = seeds.connector(PG_URL, schema=name, batch_size=3)
    yield connector, lambda rows: seeds.fill(admin, md, rows)
    connector.close()


test_a_batch_read_gives_each_person_what_reading_them_alone_gives = batch_reads_as_alone(60)


def test_a_batch_costs_the_queries_of_one_person_however_many_it_holds(
    schema: tuple[str, sa.Engine, sa.MetaData],
) -> None:
    name, admin, md = schema
    seeds.fill(admin, md, seeds.shape_rows(40))
    connector = seeds.connector(PG_URL, schema=name, batch_size=500)
    try:
        connector.locate(seeds.shape_person(1))  # reflects the tables: not counted
        statements = count_selects(connector)
        for people in (1, 40):
            statements.clear()
            batch = [seeds.shape_person(n) for n in range(1, people + 1)]
            connector.locate_many(batch)
            assert len(statements) == 8, people
            statements.clear()
            assert len(connector.export_many(batch)) == people
            assert len(statements) == 8, people
        assert_batch_reads_as_alone(connector, [seeds.shape_person(n) for n in range(1, 41)])
    finally:
        connector.close()
