"""The SQL connector's batch reads (`locate_many`, `export_many`) on SQLite: each person
of a batch gets exactly what a read for them alone gives, and a batch costs as many
queries as one person does (tests/integration/connectors has the same on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import BatchReads, ConnectorError, Identity, export_each, locate_each
from connectors.sql import REDACTED, SqlConnector
from tests.unit.connectors import batch_seeds as seeds
from tests.unit.connectors.batch_seeds import STORE


@contextmanager
def sqlite_store(
    folder: Path, lenient: str | None = None
) -> Iterator[tuple[SqlConnector, Callable[[dict[str, list[dict[str, Any]]]], None]]]:
    """The forum store in a SQLite file, and a function that replaces its rows."""
    url = f"sqlite:///{folder / 'forum.db'}"
    engine = sa.create_engine(url)
    md = seeds.create_tables(engine, lenient=lenient)
    connector = seeds.connector(url, batch_size=3)  # small: values span several queries
    try:
        yield connector, lambda rows: seeds.fill(engine, md, rows)
    finally:
        connector.close()
        engine.dispose()


@pytest.fixture(scope="module", params=[None, "NOCASE"], ids=["exact", "nocase"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SqlConnector, Any]]:
    """The forum store, its emails, member numbers and profile references compared
    exactly, or without regard to (ASCII) case."""
    with sqlite_store(tmp_path_factory.mktemp("batch"), lenient=request.param) as store:
        yield store


def assert_batch_reads_as_alone(connector: SqlConnector, people: list[Identity]) -> None:
    alone = [connector.locate(who) for who in people]
    assert connector.locate_many(people) == alone
    exports = [connector.export(who) for who in people]
    assert connector.export_many(people) == exports


def batch_reads_as_alone(examples: int) -> Callable[..., None]:
    """The property every backend's batch reads hold, over random stores and people, as a
    test on the module's `store` fixture (a connector and a function filling its rows)."""

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=seeds.store_rows(), people=st.lists(seeds.identity_strategy(), max_size=8))
    def test(
        store: tuple[SqlConnector, Any],
        rows: dict[str, list[dict[str, Any]]],
        people: list[Identity],
    ) -> None:
        connector, fill = store
        fill(rows)
        assert_batch_reads_as_alone(connector, people)
        # and the same people twice over, in another order: duplicates change nothing
        assert_batch_reads_as_alone(connector, [*people, *reversed(people)])

    return test


test_a_batch_read_gives_each_person_what_reading_them_alone_gives = batch_reads_as_alone(150)


def test_people_sharing_rows_each_get_them_with_their_own_path_and_redactions(
    store: tuple[SqlConnector, Any],
) -> None:
    connector, fill = store
    ann, bo = seeds.EMAILS[0], seeds.EMAILS[1]
    fill(
        {
            "accounts": [
                {"id": 1, "email": ann, "user_id": 7, "name": "Ann", "password_hash": "s1"},
                {"id": 2, "email": bo, "user_id": 8, "name": "Bo", "password_hash": "s2"},
                {
                    "id": 3,
                    "email": seeds.ERASED,
                    "user_id": 9,
                    "name": "[erased]",
                    "password_hash": None,
                },
            ],
            "profiles": [{"id": "p-1", "email": ann, "member_no": "m-9", "handle": "ann"}],
            # Bo's post mentions Ann; Ann likes Bo's post; account 3 (anonymized) invoiced
            "posts": [{"id": 1, "author_id": 2, "mentions_id": 1, "title": "hello"}],
            "likes": [{"id": 1, "profile_id": "p-1", "post_id": 1, "at": "t"}],
            "invoices": [{"id": 1, "account_id": 3, "amount": "5.00"}],
        }
    )
    people = [Identity(ann), Identity(bo), Identity("", product_ids={STORE: "9"})]
    located = connector.locate_many(people)
    like = [[r for r in found.records if r.collection == "likes"] for found in located]
    assert [r.via for r in like[0]] == ["likes.profile_id"]  # Ann's, as the one who liked
    assert [r.via for r in like[1]] == ["likes.post_id"]  # and Bo's, as the post's author
    assert located[0].discovered_ids == {STORE: "7"}
    # the anonymized account is never reported, nor names a user id; its invoice is kept
    assert [(r.collection, r.retained) for r in located[2].records] == [("invoices", True)]
    assert located[2].discovered_ids == {}
    ann_export, bo_export, _ = connector.export_many(people)
    assert ann_export.records["likes"] == [{"id": 1, "post_id": 1, "profile_id": "p-1", "at": "t"}]
    assert bo_export.records["likes"][0]["profile_id"] == REDACTED  # Ann's profile, to Bo
    assert bo_export.records["posts"][0]["mentions_id"] == REDACTED  # Ann's account, to Bo
    assert "posts" not in ann_export.records  # mentioned in it, but it is not hers
    assert_batch_reads_as_alone(connector, people)


def test_people_whose_ids_a_case_insensitive_column_takes_for_one_each_find_all_rows(
    tmp_path: Path,
) -> None:
    """To a NOCASE column m-9 and M-9 are one member number, and p-3 and P-3 (two
    profiles) one profile reference: whoever asks for either finds the rows of both,
    alone and so in a batch, though Python tells the values apart."""
    with sqlite_store(tmp_path, lenient="NOCASE") as (connector, fill):
        fill(
            {
                "profiles": [
                    {"id": "p-1", "email": "ann@example.com", "member_no": "m-9", "handle": "a"},
                    {"id": "p-2", "email": "bo@example.com", "member_no": "M-9", "handle": "b"},
                    {"id": "p-3", "email": "cy@example.com", "member_no": "c-1", "handle": "c"},
                    {"id": "P-3", "email": "di@example.com", "member_no": "d-1", "handle": "d"},
                ],
                "likes": [
                    {"id": 1, "profile_id": "p-3", "post_id": None, "at": "t1"},
                    {"id": 2, "profile_id": "P-3", "post_id": None, "at": "t2"},
                ],
            }
        )
        people = [
            Identity("", product_ids={STORE: "m-9"}),
            Identity("", product_ids={STORE: "M-9"}),
            Identity("cy@example.com"),
            Identity("di@example.com"),
        ]
        found = [{(r.collection, r.key) for r in f.records} for f in connector.locate_many(people)]
        assert found[0] == found[1] == {("profiles", "p-1"), ("profiles", "p-2")}
        assert found[2] == {("profiles", "p-3"), ("likes", "1"), ("likes", "2")}
        assert found[3] == {("profiles", "P-3"), ("likes", "1"), ("likes", "2")}
        assert_batch_reads_as_alone(connector, people)
        assert_batch_reads_as_alone(connector, [*people, *reversed(people)])


def test_a_row_found_for_one_person_by_email_is_found_for_another_by_a_look_alike_id(
    tmp_path: Path,
) -> None:
    """Ann's profile matches her email exactly and, to a NOCASE column, the member number
    m-9 someone else asks for: it is both people's, in a batch as alone."""
    with sqlite_store(tmp_path, lenient="NOCASE") as (connector, fill):
        ann = {"id": "p-1", "email": "ann@example.com", "member_no": "M-9", "handle": "a"}
        fill({"profiles": [ann]})
        people = [Identity("ann@example.com"), Identity("", product_ids={STORE: "m-9"})]
        found = connector.locate_many(people)
        assert [[r.key for r in f.records] for f in found] == [["p-1"], ["p-1"]]
        assert_batch_reads_as_alone(connector, people)


def test_a_batch_finds_rows_the_database_matches_across_types(tmp_path: Path) -> None:
    """SQLite compares a text column with a number as text: a row Python cannot tell
    whose it is has the table read person by person, never dropped."""
    url = f"sqlite:///{tmp_path / 'forum.db'}"
    engine = sa.create_engine(url)
    md = seeds.create_tables(engine)
    with engine.begin() as conn:  # the owner column declared as text, holding '1', '2'
        conn.exec_driver_sql("DROP TABLE invoices")
        conn.exec_driver_sql(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, account_id TEXT, amount TEXT)"
        )
    rows = seeds.shape_rows(3)
    for invoice in rows["invoices"]:
        invoice["account_id"] = str(invoice["account_id"])
    seeds.fill(engine, md, rows)
    connector = seeds.connector(url)
    try:
        people = [seeds.shape_person(n) for n in (1, 2, 3, 2)]
        found = connector.locate_many(people)
        assert [[r.key for r in f.records if r.collection == "invoices"] for f in found] == [
            ["1"],
            ["2"],
            ["3"],
            ["2"],
        ]
        assert_batch_reads_as_alone(connector, people)
    finally:
        connector.close()
        engine.dispose()


def count_selects(connector: SqlConnector) -> list[str]:
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    sa.event.listen(connector._get_engine(), "before_cursor_execute", seen)
    return statements


@pytest.mark.parametrize("people", [1, 12, 40])
def test_a_batch_costs_the_queries_of_one_person_however_many_it_holds(
    tmp_path: Path, people: int
) -> None:
    url = f"sqlite:///{tmp_path / 'forum.db'}"
    engine = sa.create_engine(url)
    seeds.fill(engine, seeds.create_tables(engine), seeds.shape_rows(people))
    connector = seeds.connector(url, batch_size=500)
    try:
        connector.locate(seeds.shape_person(1))  # reflects the tables: not counted
        statements = count_selects(connector)
        batch = [seeds.shape_person(n) for n in range(1, people + 1)]
        found = connector.locate_many(batch)
        assert all(len(f.records) == 7 + (people > 1) for f in found)  # a like of theirs too
        # 2 identity tables, then level 1 (posts, likes by profile, invoices), level 2
        # (likes on posts, attachments), level 3 (thumbnails): 8, for 1 person or 40
        assert len(statements) == 8
        statements.clear()
        connector.export_many(batch)
        assert len(statements) == 8
    finally:
        connector.close()
        engine.dispose()


def test_the_helpers_read_in_one_batch_or_one_by_one(store: tuple[SqlConnector, Any]) -> None:
    from connectors.memory import MemoryConnector

    connector, fill = store
    fill(seeds.shape_rows(3))
    people = [seeds.shape_person(n) for n in (1, 2, 3)]
    assert isinstance(connector, BatchReads)
    assert locate_each(connector, people) == [connector.locate(p) for p in people]
    assert export_each(connector, people) == [connector.export(p) for p in people]
    assert locate_each(connector, []) == []
    plain = MemoryConnector("crm", people=[{"id": "1", "email": "person1@example.com"}])
    assert not isinstance(plain, BatchReads)
    assert [len(f.records) for f in locate_each(plain, people)] == [1, 0, 0]
    assert plain.calls == ["locate"] * 3


def test_a_batch_read_answering_for_too_few_people_is_refused(
    store: tuple[SqlConnector, Any],
) -> None:
    connector, fill = store
    fill(seeds.shape_rows(2))

    class DropsTheLast(SqlConnector):
        def locate_many(self, identities: Sequence[Identity]) -> list[Any]:
            return super().locate_many(identities)[:-1]

    short = DropsTheLast(STORE, connector.mapping, connector.url)
    try:
        with pytest.raises(ConnectorError, match="locate_many returned 1 result"):
            locate_each(short, [seeds.shape_person(1), seeds.shape_person(2)])
    finally:
        short.close()
