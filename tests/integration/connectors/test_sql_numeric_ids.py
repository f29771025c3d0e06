"""A store whose user id column is numeric: product ids arrive as text and must still
match (PostgreSQL refuses to compare bigint with varchar), on SQLite and PostgreSQL."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors.base import Identity
from connectors.sql import SqlConnector, SqlMapping
from tests.conftest import postgres_database

MAPPING = """
[store]
title = "Numeric ids"
description = "A store keyed by integers."

[tables.users]
primary_key = "id"
identity = { email = "email", user_id = "id" }
erase = { strategy = "delete" }
columns = { email = "contact details" }
facts = { purpose = "p", categories = ["c"], recipients = ["r"], retention = "t", source = "s" }

[tables.posts]
primary_key = "id"
references.user_id = { to = "users.id", owner = true }
erase = { strategy = "delete" }
columns = { body = "user content" }
facts = { purpose = "p", categories = ["c"], recipients = ["r"], retention = "t", source = "s" }
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'numeric.db'}"
    else:
        with postgres_database() as pg:
            yield pg


def test_a_text_product_id_finds_and_erases_rows_keyed_by_integers(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id BIGINT PRIMARY KEY, email VARCHAR(254))"))
        conn.execute(
            sa.text(
                "CREATE TABLE posts (id BIGINT PRIMARY KEY, user_id BIGINT REFERENCES users(id), "
                "body TEXT)"
            )
        )
        conn.execute(sa.text("INSERT INTO users VALUES (41, 'ann@example.com'), (42, 'bo@x.org')"))
        conn.execute(sa.text("INSERT INTO posts VALUES (1, 41, 'hi'), (2, 42, 'yo')"))
    engine.dispose()
    store = SqlConnector(
        "numeric", SqlMapping.from_dict(tomllib.loads(MAPPING), store="numeric"), url
    )
    try:
        by_id = Identity(email="someone-else@example.com", product_ids={"numeric": "41"})
        assert {(r.collection, r.key) for r in store.locate(by_id).records} == {
            ("users", "41"),
            ("posts", "1"),
        }
        assert (
            store.locate(Identity(email="x@example.com", product_ids={"numeric": "v-41"})).records
            == ()
        )  # not an integer: matches nothing, fails nothing
        assert store.erase(by_id).deleted == 2
        assert store.locate(by_id).records == ()
        assert [r.key for r in store.locate(Identity("bo@x.org")).records] == ["42", "2"]
    finally:
        store.close()
