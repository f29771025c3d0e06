"""A small SQL store where people share rows, for comparing batch reads with single ones.

Two identity tables (accounts: email and a numeric user id, anonymized on erasure;
profiles: email and a text member number), owner references up to three levels deep,
rows owned through two parents at once (a like belongs to whoever liked and to the
author of the post liked), a non-owner reference to another account (redacted in an
export), and retained invoices. `store_rows` draws its contents from a hypothesis
strategy, `shape_rows` gives every one of n people one row of each kind.
"""

from __future__ import annotations

import tomllib
from typing import Any

import sqlalchemy as sa
from hypothesis import strategies as st

from connectors.base import Identity
from connectors.sql import SqlConnector, SqlMapping

STORE = "forum"
FACTS = """purpose = "Run the forum"
categories = ["user content"]
recipients = ["forum members"]
retention = "While the account is active"
source = "Provided by you"
"""
MAPPING = f"""
[store]
title = "Forum"
description = "Accounts, profiles, posts and what hangs on them."

[tables.accounts]
primary_key = "id"
identity = {{ email = "email", user_id = "user_id" }}
erase = {{ strategy = "anonymize", columns = {{ email = "email", name = "redact" }} }}
[tables.accounts.columns]
email = "contact details"
user_id = "identifiers"
name = "identity"
password_hash = {{ category = "credentials", secret = true }}
[tables.accounts.facts]
{FACTS}
[tables.profiles]
primary_key = "id"
identity = {{ email = "email", user_id = "member_no" }}
erase = {{ strategy = "delete" }}
[tables.profiles.columns]
email = "contact details"
member_no = "identifiers"
handle = "identity"
[tables.profiles.facts]
{FACTS}
[tables.posts]
primary_key = "id"
references.author_id = {{ to = "accounts.id", owner = true }}
references.mentions_id = {{ to = "accounts.id", owner = false, on_parent_erase = "null" }}
erase = {{ strategy = "delete" }}
[tables.posts.columns]
title = "user content"
[tables.posts.facts]
{FACTS}
[tables.likes]
primary_key = "id"
references.profile_id = {{ to = "profiles.id", owner = true }}
references.post_id = {{ to = "posts.id", owner = true }}
erase = {{ strategy = "delete" }}
[tables.likes.columns]
at = "activity"
[tables.likes.facts]
{FACTS}
[tables.attachments]
primary_key = "id"
references.post_id = {{ to = "posts.id", owner = true }}
erase = {{ strategy = "delete" }}
[tables.attachments.columns]
name = "user content"
[tables.attachments.facts]
{FACTS}
[tables.thumbnails]
primary_key = "id"
references.attachment_id = {{ to = "attachments.id", owner = true }}
erase = {{ strategy = "delete" }}
[tables.thumbnails.columns]
size = "user content"
[tables.thumbnails.facts]
{FACTS}
[tables.invoices]
primary_key = "id"
references.account_id = {{ to = "accounts.id", owner = true }}
erase = {{ strategy = "retain", legal_basis = "Tax law", period = "10 years" }}
[tables.invoices.columns]
amount = "financial data"
[tables.invoices.facts]
{FACTS}
"""

EMAILS = ["ann@example.com", "bo@example.com", "cy@example.com", "di@example.com"]
# one to a case- and accent-insensitive collation with Ann's and Bo's, not to Python
ACCENTED = ["ánn@example.com", "BÖ@example.com"]
ERASED = "erased-0123456789abcdef@invalid.example"
MEMBER_NOS = ["7", "8", "m-9", "M-9", "10"]
USER_IDS = [7, 8, 9, 10]


def mapping() -> SqlMapping:
    return SqlMapping.from_dict(tomllib.loads(MAPPING), store=STORE)


def create_tables(
    engine: sa.Engine, schema: str | None = None, lenient: str | None = None
) -> sa.MetaData:
    """The store's tables; `lenient` names a collation (NOCASE on SQLite, a `_ci` one on
    MariaDB) for the text columns people are found by: emails, member numbers and the
    likes' profile reference (keys stay as the database makes them)."""
    md = sa.MetaData(schema=schema)
    text, num = sa.Text, sa.Integer
    found_by = sa.String(120, collation=lenient)
    sa.Table(
        "accounts",
        md,
        sa.Column("id", num, primary_key=True),
        sa.Column("email", found_by),
        *(sa.Column(c, text) for c in ("name", "password_hash")),
        sa.Column("user_id", num),
    )
    sa.Table(
        "profiles",
        md,
        sa.Column("id", sa.String(64), primary_key=True),  # a key: MariaDB wants a length
        *(sa.Column(c, found_by) for c in ("email", "member_no")),
        sa.Column("handle", text),
    )
    for name, refs, column in (
        ("posts", ("author_id", "mentions_id"), "title"),
        ("likes", ("post_id",), "at"),
        ("attachments", ("post_id",), "name"),
        ("thumbnails", ("attachment_id",), "size"),
        ("invoices", ("account_id",), "amount"),
    ):
        extra = [sa.Column("profile_id", found_by)] if name == "likes" else []
        sa.Table(
            name,
            md,
            sa.Column("id", num, primary_key=True),
            *(sa.Column(r, num) for r in refs),
            *extra,
            sa.Column(column, text),
        )
    md.create_all(engine)
    return md


def fill(engine: sa.Engine, md: sa.MetaData, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Replace the store's contents with `rows` (no foreign keys: dangling ids allowed)."""
    with engine.begin() as conn:
        for table in reversed(md.sorted_tables):
            conn.execute(table.delete())
        for table in md.sorted_tables:
            if rows.get(table.name):
                conn.execute(table.insert(), rows[table.name])


def connector(url: str, schema: str | None = None, batch_size: int = 3) -> SqlConnector:
    return SqlConnector(STORE, mapping(), url, schema=schema, batch_size=batch_size)


# --------------------------------------------------------------------------- random rows


def _email() -> st.SearchStrategy[str]:
    """A known email, as stored: any case, accented, with spaces around, or anonymized."""
    plain = st.sampled_from([*EMAILS, *ACCENTED])
    styled = st.tuples(plain, st.sampled_from(["", " ", "  "]), st.booleans()).map(
        lambda t: f"{t[1]}{t[0].upper() if t[2] else t[0]}{t[1]}"
    )
    return st.one_of(styled, st.just(ERASED), st.just("nobody@example.net"))


@st.composite
def store_rows(draw: st.DrawFn) -> dict[str, list[dict[str, Any]]]:
    accounts = draw(st.integers(0, 7))
    profiles = draw(st.integers(0, 5))
    posts = draw(st.integers(0, 8))
    attachments = draw(st.integers(0, 6))
    maybe_account = st.one_of(st.none(), st.integers(1, accounts + 1))  # +1: dangling
    maybe_post = st.one_of(st.none(), st.integers(1, posts + 1))
    rows: dict[str, list[dict[str, Any]]] = {
        "accounts": [
            {
                "id": i,
                "email": draw(_email()),
                "user_id": draw(st.one_of(st.none(), st.sampled_from(USER_IDS))),
                "name": f"Name {i}",
                "password_hash": f"secret-{i}",
            }
            for i in range(1, accounts + 1)
        ],
        "profiles": [
            {
                "id": f"p-{i}",
                "email": draw(_email()),
                "member_no": draw(st.one_of(st.none(), st.sampled_from(MEMBER_NOS))),
                "handle": f"handle{i}",
            }
            for i in range(1, profiles + 1)
        ],
        "posts": [
            {
                "id": i,
                "author_id": draw(maybe_account),
                "mentions_id": draw(maybe_account),
                "title": f"post {i}",
            }
            for i in range(1, posts + 1)
        ],
        "likes": [
            {
                "id": i,
                "profile_id": draw(  # P-1 is p-1 only to a case-insensitive column
                    st.one_of(
                        st.none(),
                        st.sampled_from(
                            [f"{p}-{n}" for n in range(1, profiles + 2) for p in ("p", "P")]
                        ),
                    )
                ),
                "post_id": draw(maybe_post),
                "at": f"t{i}",
            }
            for i in range(1, draw(st.integers(0, 8)) + 1)
        ],
        "attachments": [
            {"id": i, "post_id": draw(maybe_post), "name": f"file{i}"}
            for i in range(1, attachments + 1)
        ],
        "thumbnails": [
            {
                "id": i,
                "attachment_id": draw(st.one_of(st.none(), st.integers(1, attachments + 1))),
                "size": "s",
            }
            for i in range(1, draw(st.integers(0, 5)) + 1)
        ],
        "invoices": [
            {"id": i, "account_id": draw(maybe_account), "amount": f"{i}.00"}
            for i in range(1, draw(st.integers(0, 4)) + 1)
        ],
    }
    return rows


def identity_strategy() -> st.SearchStrategy[Identity]:
    """Someone asking: a known email (any case and spacing, or accented), an unknown or
    empty one, an anonymized one, with or without a product id (one that fits the numeric
    user id column, one that only fits the text member number in either case, one that
    fits neither)."""
    email = st.one_of(
        st.sampled_from([*EMAILS, *ACCENTED]),
        st.sampled_from(EMAILS).map(lambda e: f" {e.upper()} "),
        st.sampled_from(["", "missing@example.org", ERASED]),
    )
    product = st.one_of(
        st.just({}),
        st.sampled_from(["7", "8", "9", "10", "m-9", "M-9", "x7", ""]).map(lambda v: {STORE: v}),
        st.just({"other-store": "7"}),
    )
    return st.builds(Identity, email=email, product_ids=product)


# --------------------------------------------------------------------------- fixed shape


def shape_rows(people: int) -> dict[str, list[dict[str, Any]]]:
    """Every person n (email person<n>@example.com) owns one row of each kind, and their
    post is liked by the next person: every table and level is read for any batch."""
    rows: dict[str, list[dict[str, Any]]] = {
        t: []
        for t in ("accounts", "profiles", "posts", "likes", "attachments", "thumbnails", "invoices")
    }
    for n in range(1, people + 1):
        email = f"person{n}@example.com"
        rows["accounts"].append(
            {"id": n, "email": email, "user_id": 1000 + n, "name": "x", "password_hash": "h"}
        )
        rows["profiles"].append(
            {"id": f"p-{n}", "email": email, "member_no": str(1000 + n), "handle": "h"}
        )
        rows["posts"].append({"id": n, "author_id": n, "mentions_id": None, "title": "t"})
        rows["likes"].append(
            {"id": n, "profile_id": f"p-{n}", "post_id": n % people + 1, "at": "t"}
        )
        rows["attachments"].append({"id": n, "post_id": n, "name": "f"})
        rows["thumbnails"].append({"id": n, "attachment_id": n, "size": "s"})
        rows["invoices"].append({"id": n, "account_id": n, "amount": "1.00"})
    return rows


def shape_person(n: int) -> Identity:
    return Identity(f"person{n}@example.com")
