"""`lenient_keys` against the collations it claims to cover: every two ASCII texts a
collation takes for one share a key, so a batch read never misses people it confuses.

Each database groups a few thousand short texts by its own comparison (GROUP BY under
the collation); any group whose members do not all share a key is a miss. Run on
SQLite's NOCASE and RTRIM, every utf8mb4 collation of the MariaDB server, and on
PostgreSQL ICU collations (root at every strength, shifted, numeric; the tailorings
that make different ASCII letters one) and citext.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import string
from collections.abc import Iterable

import pytest
import sqlalchemy as sa

from connectors.sql import lenient_keys
from tests.conftest import postgres_database

MARIADB_URL = "mysql+pymysql://root:@127.0.0.1:3306/test?charset=utf8mb4"
ICU_LOCALES = [
    *(
        f"und-u-ks-level{strength}{shifted}{numeric}"
        for strength in (1, 2, 3)
        for shifted in ("", "-ka-shifted")
        for numeric in ("", "-kn")
    ),
    # tailorings that make different ASCII letters (or letters and digraphs) one
    *(
        f"{language}-u-ks-level1-ka-shifted"
        for language in ("hu", "kl", "lt", "da", "de-u-co-phonebk", "sv-u-co-trad", "fi-u-co-trad")
    ),
]


def ascii_texts() -> list[str]:
    """Every ASCII text of up to two characters and of three letters, and texts of zeros,
    spaces and punctuation, and of Hungarian doubled digraphs."""
    characters = [chr(c) for c in range(128)]
    texts = {"", *characters}
    texts.update("".join(p) for p in itertools.product(characters[32:127], repeat=2))
    texts.update("".join(p) for p in itertools.product(string.ascii_lowercase + "0", repeat=3))
    texts.update("".join(p) for p in itertools.product("01a. -\x01", repeat=4))
    for digraph in ("cs", "dz", "dzs", "gy", "ly", "ny", "sz", "ty", "zs"):
        texts.update({digraph[0] + digraph, digraph * 2, f"a{digraph[0]}{digraph}a"})
    return sorted(texts)


def missed(groups: Iterable[list[str]]) -> list[tuple[str, str]]:
    """Pairs of texts the database took for one that share no lenient key."""
    pairs: list[tuple[str, str]] = []
    for group in groups:
        keys = [set(lenient_keys(text)) for text in group]
        pairs.extend(
            (group[i], group[j])
            for i, j in itertools.combinations(range(len(group)), 2)
            if keys[i].isdisjoint(keys[j])
        )
    return pairs


def test_sqlite_nocase_and_rtrim_take_for_one_only_texts_sharing_a_key() -> None:
    texts = ascii_texts()
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE texts (id INTEGER, t TEXT)")
        db.executemany("INSERT INTO texts VALUES (?, ?)", enumerate(texts))
        for collation in ("NOCASE", "RTRIM"):
            rows = db.execute(
                f"SELECT group_concat(id) FROM texts GROUP BY t COLLATE {collation} "
                "HAVING count(*) > 1"
            ).fetchall()
            assert rows, collation
            groups = [[texts[int(i)] for i in ids.split(",")] for (ids,) in rows]
            assert missed(groups) == [], collation
    finally:
        db.close()


@pytest.mark.postgres
def test_mariadb_collations_take_for_one_only_texts_sharing_a_key() -> None:
    texts = ascii_texts()
    engine = sa.create_engine(MARIADB_URL)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(
                "CREATE TEMPORARY TABLE texts (id INT PRIMARY KEY, t VARBINARY(8))"
            )
            conn.execute(
                sa.text("INSERT INTO texts VALUES (:id, :t)"),
                [{"id": i, "t": t.encode()} for i, t in enumerate(texts)],
            )
            collations = conn.exec_driver_sql(
                "SELECT collation_name FROM information_schema.collations "
                "WHERE character_set_name = 'utf8mb4'"
            ).scalars()
            misses = {}
            for collation in collations:
                rows = conn.exec_driver_sql(
                    "SELECT group_concat(id) FROM texts "
                    f"GROUP BY convert(t USING utf8mb4) COLLATE {collation} HAVING count(*) > 1"
                ).scalars()
                groups = [[texts[int(i)] for i in ids.split(",")] for ids in rows]
                misses[collation] = missed(groups)[:5]
        assert len(misses) > 20
        assert {c: m for c, m in misses.items() if m} == {}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_icu_collations_and_citext_take_for_one_only_texts_sharing_a_key() -> None:
    texts = [t for t in ascii_texts() if "\x00" not in t]  # PostgreSQL text holds no NUL
    with postgres_database() as url:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql("CREATE EXTENSION citext")
                conn.exec_driver_sql("CREATE TABLE texts (id INT, t TEXT)")
                conn.execute(
                    sa.text("INSERT INTO texts VALUES (:id, :t)"),
                    [{"id": i, "t": t} for i, t in enumerate(texts)],
                )
                grouped_by = {"citext": "t::citext"}
                for locale in ICU_LOCALES:
                    name = "lenient_" + re.sub(r"\W", "_", locale)
                    conn.exec_driver_sql(
                        f"CREATE COLLATION {name} "
                        f"(provider = icu, locale = '{locale}', deterministic = false)"
                    )
                    grouped_by[locale] = f"t COLLATE {name}"
                misses = {}
                for collation, expression in grouped_by.items():
                    rows = conn.exec_driver_sql(
                        f"SELECT array_agg(id) FROM texts GROUP BY {expression} HAVING count(*) > 1"
                    ).scalars()
                    misses[collation] = missed([[texts[i] for i in ids] for ids in rows])[:5]
            assert {c: m for c, m in misses.items() if m} == {}
        finally:
            engine.dispose()
