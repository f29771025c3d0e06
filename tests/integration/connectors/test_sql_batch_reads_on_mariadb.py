"""The SQL connector's batch reads on a real MariaDB server, whose text columns compare
without regard to case, accents or trailing spaces: two people asking for values Python
tells apart may ask for one value there, and each of them must still get in a batch
exactly what a read for them alone gives (the SQLite twin, with NOCASE columns, is
tests/unit/connectors/test_sql_batch_reads.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from connectors.base import Identity
from connectors.sql import SqlConnector
from tests.integration.connectors.servers import admin_engine
from tests.unit.connectors import batch_seeds as seeds
from tests.unit.connectors.batch_seeds import STORE
from tests.unit.connectors.test_sql_batch_reads import (
    assert_batch_reads_as_alone,
    batch_reads_as_alone,
)

MARIADB_URL = "mysql+pymysql://root:@127.0.0.1:3306/test"

pytestmark = pytest.mark.postgres  # the servers' marker (see test_sql_on_servers.py)


@pytest.fixture(
    scope="module", params=["utf8mb4_general_ci", "utf8mb4_unicode_520_ci"], ids=lambda c: c
)
def store(request: pytest.FixtureRequest) -> Iterator[tuple[SqlConnector, Any]]:
    """The forum store in a database of its own, its emails, member numbers and profile
    references in the given lenient collation (the keys in the server's default)."""
    admin = admin_engine("mariadb", MARIADB_URL)
    name = f"batch_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    connector = seeds.connector(MARIADB_URL, schema=name, batch_size=3)
    try:
        md = seeds.create_tables(admin, schema=name, lenient=request.param)
        yield connector, lambda rows: seeds.fill(admin, md, rows)
    finally:
        connector.close()
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


test_a_batch_read_gives_each_person_what_reading_them_alone_gives = batch_reads_as_alone(60)


def test_people_whose_emails_differ_only_by_accents_each_find_both_accounts(
    store: tuple[SqlConnector, Any],
) -> None:
    """jose@ and josé@ are one email to the collation, as m-9 and M-9 are one member
    number: each person asking for one of them finds the rows of both, alone and in a
    batch."""
    connector, fill = store
    fill(
        {
            "accounts": [
                {"id": 1, "email": "jose@x.example", "user_id": 7},
                {"id": 2, "email": "José@x.example", "user_id": 8},
            ],
            "profiles": [
                {"id": "p-1", "email": "ann@example.com", "member_no": "m-9", "handle": "a"},
                {"id": "p-2", "email": "bo@example.com", "member_no": "M-9", "handle": "b"},
            ],
            "invoices": [
                {"id": 1, "account_id": 1, "amount": "1.00"},
                {"id": 2, "account_id": 2, "amount": "2.00"},
            ],
        }
    )
    people = [
        Identity("jose@x.example"),
        Identity(" JOSÉ@x.example"),
        Identity("", product_ids={STORE: "m-9"}),
        Identity("", product_ids={STORE: "M-9"}),
    ]
    found = [{(r.collection, r.key) for r in f.records} for f in connector.locate_many(people)]
    jose = {("accounts", "1"), ("accounts", "2"), ("invoices", "1"), ("invoices", "2")}
    assert found[0] == found[1] == jose
    assert found[2] == found[3] == {("profiles", "p-1"), ("profiles", "p-2")}
    assert_batch_reads_as_alone(connector, people)


def test_a_row_found_for_one_person_by_email_is_found_for_another_by_a_look_alike_id(
    store: tuple[SqlConnector, Any],
) -> None:
    """Ann's profile matches her email exactly and, to the collation, the member number
    N-1 someone else asks for ("ñ-1 " as stored): it is both people's, in a batch as
    alone."""
    connector, fill = store
    fill(
        {
            "profiles": [
                {"id": "p-1", "email": "ann@example.com", "member_no": "ñ-1 ", "handle": "a"}
            ]
        }
    )
    people = [Identity("ann@example.com"), Identity("", product_ids={STORE: "N-1"})]
    found = connector.locate_many(people)
    assert [[r.key for r in f.records] for f in found] == [["p-1"], ["p-1"]]
    assert_batch_reads_as_alone(connector, people)
