"""Declarative SQL connector: a product store described by a mapping file, not by code.

A product team writes a TOML mapping of its tables (who owns which row, which columns
are secret, how each table is erased) and gets locate, export, correct, erase and
opt-out without writing SQL. Everything goes through SQLAlchemy Core with bound
parameters and quoted identifiers, so the same mapping runs on SQLite, PostgreSQL and
MariaDB.

Mapping format (one file per store)::

    [store]
    title = "Video library"
    description = "Videos, comments and views of Allego users."

    [tables.users]
    primary_key = "id"
    identity = { email = "email", user_id = "id" }
    correctable = { name = "name", email = "email", phone = "phone" }
    contact_preference = { column = "marketing_emails", opted_out = false }
    erase = { strategy = "delete" }
    [tables.users.columns]
    email = "contact details"
    password_hash = { category = "credentials", secret = true }
    [tables.users.facts]
    purpose = "..."; categories = ["..."]; recipients = ["..."]
    retention = "..."; source = "..."; automated_decisions = "none"

    [tables.comments]
    primary_key = "id"
    references.author_id = { to = "users.id", owner = true }
    references.video_id = { to = "videos.id", owner = false, on_parent_erase = "delete" }
    erase = { strategy = "anonymize", columns = { body = "redact", author_id = "null" } }

    [tables.invoices]
    erase = { strategy = "retain", legal_basis = "...", period = "..." }

    [tables.courses]          # reference data, not about a person
    primary_key = "id"
    person_data = false

An *owner* reference makes a row the person's when the row it points to is theirs; a
non-owner reference is context only (another user's comment on the person's video),
so such rows are never exported, but they are removed (or their reference nulled,
`on_parent_erase = "null"`) before the person's row they depend on is deleted.
Anonymizers: `email` (erased-<hash>@invalid.example), `hash` (erased-<hash>),
`redact` ("[erased]") and `null`.

Reads for a batch of people (`locate_many`, `export_many`, see `BatchReads`) cost what
a read for one costs: one query per table and level (and `batch_size` values) for the
whole batch, not one per person. Only people whose values the database may take for
one another's though Python tells them apart ('abc' and 'ABC' to a case-insensitive
collation, 'jose' and 'josé' to an accent-insensitive one) are read alone, so that a
batch finds for each person exactly what reading them alone finds.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import os
import re
import string
import threading
import tomllib
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from connectors.base import (
    Capability,
    ConnectorError,
    Correction,
    CorrectionResult,
    DataFacts,
    ErasureResult,
    FieldChange,
    Health,
    Identity,
    InvalidCorrection,
    LocateResult,
    MappingError,
    OptOutResult,
    RecordRef,
    Retention,
    StoreExport,
    StoreMetadata,
    StoreUnavailable,
    UnsupportedAction,
)

log = structlog.get_logger()

PLUGIN = "sql"
REDACTED = "[redacted]"
ERASED_TEXT = "[erased]"
ANONYMIZERS = frozenset({"email", "hash", "redact", "null"})
STRATEGIES = frozenset({"delete", "anonymize", "retain"})
ANONYMIZED_EMAIL = re.compile(r"^erased-[0-9a-f]+@invalid\.example$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE = re.compile(r"^\+?[0-9][0-9 \-]{3,30}[0-9]$")
MAX_LENGTH = {"email": 254, "phone": 32}
DEFAULT_MAX_LENGTH = 200
DEFAULT_BATCH_SIZE = 500

Row = dict[str, Any]
# Errors where the store answered and refused; every other driver error may pass on retry.
PERMANENT_ERRORS = (
    sa_exc.IntegrityError,
    sa_exc.ProgrammingError,
    sa_exc.DataError,
    sa_exc.NotSupportedError,
    sa_exc.NoSuchTableError,
    sa_exc.ArgumentError,
)


# --------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class Reference:
    """A column of `table` holding values of `target_table.target_column`."""

    table: str
    column: str
    target_table: str
    target_column: str
    owner: bool
    on_parent_erase: str = "delete"  # or "null"

    @property
    def label(self) -> str:
        return f"{self.table}.{self.column}"


@dataclass(frozen=True)
class TableMapping:
    """One table as the mapping declares it."""

    name: str
    primary_key: str
    person_data: bool
    columns: Mapping[str, str]  # column -> data category
    secret: frozenset[str]
    email_column: str | None
    user_id_column: str | None
    references: tuple[Reference, ...]
    facts: DataFacts | None
    strategy: str | None  # delete | anonymize | retain; None for non-person tables
    anonymize: Mapping[str, str]  # column -> anonymizer
    legal_basis: str
    period: str
    correctable: Mapping[str, str]  # common field name -> column
    contact_column: str | None
    opted_out_value: Any

    @property
    def is_identity(self) -> bool:
        return self.email_column is not None or self.user_id_column is not None

    @property
    def all_columns(self) -> tuple[str, ...]:
        """Every column the connector reads: primary key first, then in mapping order."""
        seen: dict[str, None] = {self.primary_key: None}
        for name in (
            *self.columns,
            *(r.column for r in self.references),
            *(c for c in (self.email_column, self.user_id_column) if c),
        ):
            seen.setdefault(name, None)
        return tuple(seen)

    @property
    def owner_references(self) -> tuple[Reference, ...]:
        return tuple(r for r in self.references if r.owner)


@dataclass(frozen=True)
class SqlMapping:
    """A parsed, validated mapping: safe to run, or it would not have loaded."""

    store: str
    source: str
    title: str
    description: str
    tables: Mapping[str, TableMapping]
    erase_order: tuple[str, ...]  # children before parents

    @classmethod
    def load(cls, path: Path, store: str) -> SqlMapping:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise MappingError(
                f"store {store!r}: mapping file {path} does not exist; "
                "fix the `mapping` path in the store configuration"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise MappingError(
                f"store {store!r}: mapping file {path} is not valid TOML: {exc}"
            ) from exc
        return cls.from_dict(data, store=store, source=str(path))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, store: str, source: str = "<mapping>"
    ) -> SqlMapping:
        return _MappingParser(store, source).parse(data)

    def references_into(self, table: str) -> tuple[Reference, ...]:
        return tuple(
            r for t in self.tables.values() for r in t.references if r.target_table == table
        )


class _MappingParser:
    """Turns raw TOML into a `SqlMapping`, failing with a message that says how to fix it."""

    def __init__(self, store: str, source: str) -> None:
        self.store = store
        self.source = source

    def fail(self, where: str, problem: str, fix: str) -> MappingError:
        return MappingError(
            f"store {self.store!r}: mapping {self.source}: {where}: {problem}; {fix}"
        )

    def text(self, raw: Mapping[str, Any], key: str, where: str) -> str:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(
                where, f"`{key}` is missing or empty", f"set `{key}` to a non-empty string"
            )
        return value

    def parse(self, data: Mapping[str, Any]) -> SqlMapping:
        store_raw = data.get("store")
        if not isinstance(store_raw, Mapping):
            raise self.fail(
                "[store]", "the table is missing", "add [store] with title and description"
            )
        title = self.text(store_raw, "title", "[store]")
        description = self.text(store_raw, "description", "[store]")
        tables_raw = data.get("tables")
        if not isinstance(tables_raw, Mapping) or not tables_raw:
            raise self.fail(
                "[tables]", "no tables are declared", "add at least one [tables.<name>]"
            )
        tables = {name: self.table(name, raw) for name, raw in tables_raw.items()}
        self.check_references(tables)
        order = self.erase_order(tables)
        self.check_erase_plan(tables)
        return SqlMapping(self.store, self.source, title, description, tables, order)

    def table(self, name: str, raw: Any) -> TableMapping:
        where = f"[tables.{name}]"
        if not isinstance(raw, Mapping):
            raise self.fail(where, "is not a table", "declare it as [tables.<name>]")
        pk = self.text(raw, "primary_key", where)
        person_data = raw.get("person_data", True)
        if not isinstance(person_data, bool):
            raise self.fail(where, "`person_data` is not a boolean", "write true or false")

        columns: dict[str, str] = {}
        secret: set[str] = set()
        for column, spec in dict(raw.get("columns", {})).items():
            if isinstance(spec, str):
                columns[column] = spec
            elif isinstance(spec, Mapping) and isinstance(spec.get("category"), str):
                columns[column] = spec["category"]
                if spec.get("secret", False) is True:
                    secret.add(column)
            else:
                raise self.fail(
                    f"{where} column {column!r}",
                    "has no data category",
                    'write `col = "category"` or `col = { category = "...", secret = true }`',
                )

        references: list[Reference] = []
        for column, spec in dict(raw.get("references", {})).items():
            rwhere = f"{where} reference {column!r}"
            if not isinstance(spec, Mapping):
                raise self.fail(
                    rwhere, "is not a table", 'write `{ to = "table.column", owner = true }`'
                )
            target = self.text(spec, "to", rwhere)
            if target.count(".") != 1:
                raise self.fail(rwhere, f"target {target!r} is not 'table.column'", "name both")
            owner = spec.get("owner")
            if not isinstance(owner, bool):
                raise self.fail(
                    rwhere,
                    "does not say whether it is an owner reference",
                    "add `owner = true` (the row belongs to the target's owner) or `owner = false`",
                )
            on_erase = spec.get("on_parent_erase", "delete")
            if on_erase not in ("delete", "null"):
                raise self.fail(
                    rwhere, f"on_parent_erase {on_erase!r} is unknown", 'use "delete" or "null"'
                )
            target_table, target_column = target.split(".")
            references.append(Reference(name, column, target_table, target_column, owner, on_erase))

        identity = raw.get("identity", {})
        if not isinstance(identity, Mapping):
            raise self.fail(
                where, "`identity` is not a table", 'write `{ email = "...", user_id = "..." }`'
            )
        email_column = identity.get("email")
        user_id_column = identity.get("user_id")

        facts: DataFacts | None = None
        strategy: str | None = None
        anonymize: dict[str, str] = {}
        legal_basis = period = ""
        if person_data:
            facts = self.facts(where, raw.get("facts"))
            erase = raw.get("erase")
            if not isinstance(erase, Mapping) or erase.get("strategy") not in STRATEGIES:
                raise self.fail(
                    where,
                    "has no valid erase strategy",
                    'add `erase = { strategy = "delete" }` (or "anonymize" with columns, '
                    'or "retain" with legal_basis and period)',
                )
            strategy = str(erase["strategy"])
            if strategy == "anonymize":
                anonymize = dict(erase.get("columns", {}))
                if not anonymize:
                    raise self.fail(
                        where, "anonymize lists no columns", 'add `columns = { col = "email" }`'
                    )
                for column, kind in anonymize.items():
                    if kind not in ANONYMIZERS:
                        raise self.fail(
                            f"{where} anonymize column {column!r}",
                            f"anonymizer {kind!r} is unknown",
                            f"use one of {sorted(ANONYMIZERS)}",
                        )
            if strategy == "retain":
                legal_basis = self.text(erase, "legal_basis", f"{where} erase")
                period = self.text(erase, "period", f"{where} erase")
        elif identity or any(r.owner for r in references):
            raise self.fail(
                where,
                "is declared `person_data = false` but has an identity or an owner reference",
                "remove `person_data = false` or the identity/owner reference",
            )

        correctable = dict(raw.get("correctable", {}))
        contact = raw.get("contact_preference")
        contact_column: str | None = None
        opted_out_value: Any = None
        if contact is not None:
            if (
                not isinstance(contact, Mapping)
                or "column" not in contact
                or "opted_out" not in contact
            ):
                raise self.fail(
                    where,
                    "`contact_preference` is incomplete",
                    'write `{ column = "marketing_emails", opted_out = false }`',
                )
            contact_column = str(contact["column"])
            opted_out_value = contact["opted_out"]

        table = TableMapping(
            name=name,
            primary_key=pk,
            person_data=person_data,
            columns=columns,
            secret=frozenset(secret),
            email_column=email_column,
            user_id_column=user_id_column,
            references=tuple(references),
            facts=facts,
            strategy=strategy,
            anonymize=anonymize,
            legal_basis=legal_basis,
            period=period,
            correctable=correctable,
            contact_column=contact_column,
            opted_out_value=opted_out_value,
        )
        known = set(table.all_columns)
        named = {
            "identity email": [email_column] if email_column else [],
            "identity user_id": [user_id_column] if user_id_column else [],
            "anonymize": list(anonymize),
            "correctable": list(correctable.values()),
            "contact_preference": [contact_column] if contact_column else [],
        }
        for what, cols in named.items():
            for column in cols:
                if column not in known:
                    raise self.fail(
                        where,
                        f"{what} names column {column!r}, which the table does not declare",
                        "declare it under [tables.<name>.columns] with its category",
                    )
        if person_data and not table.is_identity and not table.owner_references:
            raise self.fail(
                where,
                "holds person data but neither identifies a person nor has an owner reference",
                "add `identity = {...}`, an owner reference, or `person_data = false`",
            )
        return table

    def facts(self, where: str, raw: Any) -> DataFacts:
        fwhere = f"{where} facts"
        if not isinstance(raw, Mapping):
            raise self.fail(
                fwhere, "are missing", "add [tables.<name>.facts] with the Art. 15 facts"
            )
        tuples: dict[str, tuple[str, ...]] = {}
        for key in ("categories", "recipients"):
            value = raw.get(key)
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) and v for v in value)
            ):
                raise self.fail(
                    fwhere, f"`{key}` is missing or empty", f"list at least one of {key}"
                )
            tuples[key] = tuple(value)
        return DataFacts(
            purpose=self.text(raw, "purpose", fwhere),
            categories=tuples["categories"],
            recipients=tuples["recipients"],
            retention=self.text(raw, "retention", fwhere),
            source=self.text(raw, "source", fwhere),
            automated_decisions=str(raw.get("automated_decisions", "none")) or "none",
        )

    def check_references(self, tables: Mapping[str, TableMapping]) -> None:
        for table in tables.values():
            for ref in table.references:
                target = tables.get(ref.target_table)
                if target is None:
                    raise self.fail(
                        f"[tables.{table.name}] reference {ref.column!r}",
                        f"points to table {ref.target_table!r}, which the mapping does not declare",
                        f"add [tables.{ref.target_table}] (person_data = false if it holds no "
                        "personal data) or fix the reference",
                    )
                if ref.target_column not in target.all_columns:
                    raise self.fail(
                        f"[tables.{table.name}] reference {ref.column!r}",
                        f"points to column {ref.target_column!r} of {ref.target_table!r}, "
                        "which that table does not declare",
                        "declare the column or fix the reference",
                    )

    def erase_order(self, tables: Mapping[str, TableMapping]) -> tuple[str, ...]:
        """Children before parents (depth-first topological sort); a cycle is a load error."""
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise self.fail(
                    "references",
                    f"form a cycle ({cycle}), so no safe erase order exists",
                    "break the cycle: drop one reference or model it as a plain column",
                )
            state[name] = "visiting"
            # Parents (targets) must come after this table, so visit dependents first:
            for child in tables.values():
                for ref in child.references:
                    if ref.target_table == name:
                        visit(child.name, [*path, name])
            state[name] = "done"
            order.append(name)

        for name in tables:
            visit(name, [])
        # `order` lists a table only after all its dependents: children before parents.
        return tuple(order)

    def check_erase_plan(self, tables: Mapping[str, TableMapping]) -> None:
        for table in tables.values():
            where = f"[tables.{table.name}]"
            if table.strategy == "anonymize":
                if table.is_identity and (
                    table.email_column is None or table.anonymize.get(table.email_column) != "email"
                ):
                    raise self.fail(
                        where,
                        "is anonymized but its identity email column is not anonymized with "
                        "the `email` anonymizer, so erased rows would still match the person",
                        f'add `{table.email_column or "<email column>"} = "email"` to its '
                        'anonymize columns, or use strategy "delete"',
                    )
                for ref in table.owner_references:
                    if table.anonymize.get(ref.column) != "null":
                        raise self.fail(
                            where,
                            f"is anonymized but keeps its owner reference {ref.column!r}, "
                            "so erased rows would still be found",
                            f'add `{ref.column} = "null"` to its anonymize columns',
                        )
            if table.strategy == "retain":
                for ref in table.references:
                    parent = tables[ref.target_table]
                    if parent.strategy == "delete" and (ref.owner or ref.on_parent_erase != "null"):
                        raise self.fail(
                            f"{where} reference {ref.column!r}",
                            f"a retained table depends on {parent.name!r}, which is deleted "
                            "on erasure",
                            f"anonymize {parent.name!r} instead of deleting it, or set "
                            'on_parent_erase = "null" on a non-owner reference',
                        )


# --------------------------------------------------------------------------- helpers


def _typed_id(column: sa.Column[Any], value: str) -> Any:
    """A product id (text on the wire) as the id column's own type: a numeric id compared
    as text fails on PostgreSQL, and an id that cannot be of that type matches nothing."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return value
    if python_type is str:
        return value
    try:
        return python_type(value)
    except (TypeError, ValueError, decimal.InvalidOperation):
        return None


def json_safe(value: Any) -> Any:
    """Make a column value JSON-serialisable without losing precision."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def batched(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for value in values:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def normalize_email(value: str) -> str:
    return value.strip().lower()


_ASCII_LETTERS_AND_DIGITS = string.ascii_letters + string.digits
_IGNORED = bytes(c for c in range(128) if chr(c) not in _ASCII_LETTERS_AND_DIGITS)
# lower case, and the letters some tailoring makes one: j = y = i (MariaDB's Roman and
# Lithuanian), v = w = u (its Roman; ICU's traditional Swedish and Finnish), k = q (ICU's
# Greenlandic: K' is q)
_FOLDED = bytes.maketrans(
    string.ascii_letters.encode(),
    (string.ascii_lowercase * 2).translate(str.maketrans("jyvwk", "iiuuq")).encode(),
)
# ICU's Hungarian: a doubled digraph is written with its first letter doubled, ccs = cscs
# (gy, ly, ny, ty spelled with i, as the letters are folded first)
_DOUBLED_DIGRAPH = re.compile(r"(dzs|cs|dz|gi|li|ni|sz|ti|zs)\1")
# MariaDB's Lithuanian: ch is c, so chh is c followed by h
_C_AND_HS = re.compile(r"ch+")
_LEADING_ZEROS = re.compile(r"(?<![0-9])0+(?=[0-9])")


def lenient_keys(value: str) -> tuple[str, str]:
    """Two keys of an ASCII text, such that any two texts a lenient comparison may take
    for one share the first key or the second.

    Deliberately more lenient than any collation (a conservative superset): people
    whose values merely share a key are read alone, which costs a query or two, while
    people a collation confuses but the keys kept apart would lose rows. So the keys
    ignore case; spaces (trailing ones are ignored under PAD SPACE: MariaDB's and
    MySQL's collations but the NO PAD ones, `_bin` included, and SQLite's RTRIM),
    punctuation (ICU's alternate=shifted) and control characters (ignorable to Unicode
    collations); the differences between letters that tailorings make one (`_FOLDED`,
    `_DOUBLED_DIGRAPH`, `_C_AND_HS`); and, in the second key only, leading zeros (ICU's
    numeric ordering, 01 = 1; not in the first, as "a0 0" = "a00" once spaces go).

    Checked against every utf8mb4 collation of MariaDB 10.11, SQLite's NOCASE and RTRIM,
    PostgreSQL's citext, and ICU (of PostgreSQL 15): its root at every strength, shifted
    or not, numeric or not, and every language it ships at strength 1 shifted, with the
    traditional and search variants; over every ASCII text of up to two characters and
    of three letters (tests/integration/connectors/test_sql_lenient_keys_on_servers.py
    repeats the part that matters). Not checked: MySQL 8's `_0900_` collations (no
    server at hand) and collations with rules of their own.

    Only ASCII: beyond it collations disagree too much for one key (ß is s to MariaDB's
    general_ci but ss to Unicode's; general_ci takes every character beyond the BMP for
    one), so a text outside ASCII is taken as anyone's look-alike
    (`_Lookup.confusable_people`).
    """
    first = _letters_and_digits(value)
    if "0" not in value:
        return first, first
    return first, _letters_and_digits(_LEADING_ZEROS.sub("", value))


def _letters_and_digits(value: str) -> str:
    folded = value.encode("ascii").translate(_FOLDED, _IGNORED).decode("ascii")
    undoubled = _DOUBLED_DIGRAPH.sub(lambda m: m[1][0] + m[1], folded)
    return _C_AND_HS.sub("c", undoubled) if "ch" in undoubled else undoubled


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


@dataclass
class _Found:
    """The person's rows, as gathered in one transaction."""

    rows: dict[str, dict[Any, Row]]  # table -> primary key -> row
    via: dict[str, dict[Any, str]]
    hidden: dict[str, set[Any]]  # anonymized identity rows: followed, never reported
    user_id: str | None

    def visible(self, table: str) -> dict[Any, Row]:
        hidden = self.hidden.get(table, set())
        return {pk: row for pk, row in self.rows.get(table, {}).items() if pk not in hidden}


@dataclass
class _Lookup:
    """Who in a batch looks for which values of one column (or expression) of a table."""

    column: Any  # what the database compares: a column, or lower(trim(email))
    wanted: dict[Any, list[int]] = field(default_factory=dict)  # value -> people (batch positions)

    def add(self, value: Any, person: int) -> None:
        self.wanted.setdefault(value, []).append(person)

    def of(self, person: int) -> _Lookup:
        return _Lookup(self.column, {v: [person] for v, ns in self.wanted.items() if person in ns})

    @property
    def people(self) -> set[int]:
        return {n for ns in self.wanted.values() for n in ns}

    def without(self, people: set[int]) -> _Lookup:
        kept = {v: [n for n in ns if n not in people] for v, ns in self.wanted.items()}
        return _Lookup(self.column, {v: ns for v, ns in kept.items() if ns})

    def confusable_people(self) -> set[int]:
        """People whose text value a lenient comparison may take for someone else's.

        A row holding exactly one of two such values would go to its own people only,
        though the others would find it alone. Values asked for by the same people
        cannot be confused; a value outside ASCII may be anyone's look-alike.
        """
        if len(self.people) < 2:
            return set()
        confusable: set[int] = set()
        classes: dict[str, list[str]] = defaultdict(list)
        for value in self.wanted:
            if not isinstance(value, str):
                continue
            if not value.isascii():
                confusable.update(self.wanted[value])
                continue
            first, second = lenient_keys(value)
            classes[first].append(value)
            if second != first:
                classes[second].append(value)
        for values in classes.values():
            if len(values) > 1 and len({frozenset(self.wanted[v]) for v in values}) > 1:
                for value in values:
                    confusable.update(self.wanted[value])
        return confusable

    def may_match_leniently(self, value: Any) -> bool:
        """Whether the database may have matched `value`, which nobody asked for as such,
        to a wanted text value. Other values compare exactly: a number, a date."""
        if not isinstance(value, str):
            return False
        keys = self._text_keys
        if keys is None:
            return True
        return bool(keys) and (not value.isascii() or not keys.isdisjoint(lenient_keys(value)))

    @cached_property
    def _text_keys(self) -> set[str] | None:
        """The lenient keys of the wanted text values, or None if one is outside ASCII
        (anything may match it). Computed when the rows come back: the lookup is whole."""
        keys: set[str] = set()
        for value in self.wanted:
            if isinstance(value, str):
                if not value.isascii():
                    return None
                keys.update(lenient_keys(value))
        return keys


def _owners(lookups: Sequence[_Lookup], compared: Sequence[Any]) -> list[int] | None:
    """Who of a batch a row belongs to, by the values the database compared for it; None
    when that cannot be told: no one asked for any of them as such, or one may have
    matched a look-alike (`_Lookup.may_match_leniently`)."""
    owners: list[int] = []
    for lk, value in zip(lookups, compared, strict=True):
        people = lk.wanted.get(value)
        if people is not None:
            owners += people
        elif lk.may_match_leniently(value):
            return None
    return owners or None


# --------------------------------------------------------------------------- connector


@dataclass
class ErasureSteps:
    """An erasure worked out before anything changes: the rows each step touches."""

    anonymize: dict[str, dict[Any, Row]] = field(default_factory=dict)
    delete: dict[str, dict[Any, Row]] = field(default_factory=dict)  # the person's rows
    dependents: dict[str, dict[Any, Row]] = field(default_factory=dict)  # others', hanging on them
    unlink: dict[tuple[str, str], set[Any]] = field(default_factory=dict)  # (table, column)
    retained: list[Retention] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "anonymized": sum(len(v) for v in self.anonymize.values()),
            "deleted": sum(len(v) for v in self.delete.values()),
            "dependents": sum(len(v) for v in self.dependents.values()),
            "unlinked": sum(len(v) for v in self.unlink.values()),
        }


class SqlConnector:
    """A relational product store, driven by its mapping.

    The engine is created on first use, so building the connector (at worker start,
    for validation) never opens a connection.
    """

    def __init__(
        self,
        name: str,
        mapping: SqlMapping,
        url: str,
        *,
        schema: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.mapping = mapping
        self.url = url
        self.schema = schema
        self.batch_size = batch_size
        self._engine_options = dict(engine_options or {})
        self._engine: Engine | None = None
        tables = mapping.tables
        self.correctable_fields = frozenset(f for t in tables.values() for f in t.correctable)
        caps = {Capability.LOCATE, Capability.EXPORT, Capability.ERASE}
        if self.correctable_fields:
            caps.add(Capability.CORRECT)
        if any(t.contact_column for t in tables.values()):
            caps.add(Capability.OPT_OUT)
        self.capabilities = frozenset(caps)
        self.metadata = StoreMetadata(
            name=name,
            title=mapping.title,
            description=mapping.description,
            facts={t.name: t.facts for t in tables.values() if t.facts is not None},
            field_categories={
                f"{t.name}.{column}": category
                for t in tables.values()
                for column, category in t.columns.items()
            },
        )
        # Declared tables work without touching the store; on first use they are replaced
        # by reflected ones so values come back typed (Decimal, datetime) on every backend.
        md = sa.MetaData(schema=schema)
        self._tables: dict[str, sa.Table] = {
            t.name: sa.Table(t.name, md, *(sa.Column(c) for c in t.all_columns))
            for t in tables.values()
        }
        self._reflected = False
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, settings: Mapping[str, Any], data_dir: Path) -> SqlConnector:
        url = settings.get("url")
        mapping_path = settings.get("mapping")
        if not isinstance(url, str) or not url:
            raise MappingError(f"store {name!r}: `url` is missing; set an SQLAlchemy URL")
        if not isinstance(mapping_path, str | Path):
            raise MappingError(f"store {name!r}: `mapping` is missing; set the mapping TOML path")
        try:
            sa.engine.make_url(url)
        except sa_exc.ArgumentError as exc:
            raise MappingError(f"store {name!r}: `url` is not a valid SQLAlchemy URL") from exc
        mapping = SqlMapping.load(Path(mapping_path), store=name)
        return cls(
            name,
            mapping,
            url,
            schema=settings.get("schema"),
            batch_size=int(settings.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    # ------------------------------------------------------------- plumbing

    def _get_engine(self) -> Engine:
        with self._lock:  # worker threads share the connector: build one engine only
            if self._engine is None:
                url = sa.engine.make_url(self.url)
                engine = sa.create_engine(url, **self._engine_options)
                if url.get_backend_name() == "sqlite":
                    sa.event.listen(engine, "connect", _sqlite_foreign_keys)
                self._engine = engine
            return self._engine

    def _check_sqlite_file(self) -> None:
        """An absent SQLite file is an unreachable store, not an empty one (R12)."""
        url = sa.engine.make_url(self.url)
        db = url.database
        if (
            url.get_backend_name() == "sqlite"
            and db
            and db != ":memory:"
            and not db.startswith("file:")
            and not Path(db).is_file()
        ):
            raise StoreUnavailable(f"store {self.name!r}: database file is missing")

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction, with driver errors translated at the boundary."""
        self._check_sqlite_file()
        try:
            with self._get_engine().begin() as conn:
                self._reflect(conn)
                yield conn
        except PERMANENT_ERRORS as exc:
            # the store answered, and said no: retrying will not help
            raise ConnectorError(
                f"store {self.name!r} refused the operation: {type(exc).__name__}"
            ) from exc
        except (sa_exc.DBAPIError, sa_exc.DisconnectionError, sa_exc.TimeoutError) as exc:
            log.warning("store_unavailable", store=self.name, error=type(exc).__name__)
            raise StoreUnavailable(
                f"store {self.name!r} is unavailable: {type(exc).__name__}"
            ) from exc

    def _reflect(self, conn: Connection) -> None:
        """Reflect the declared tables once; a missing table keeps its declared form.

        Only the declared columns are ever read, so columns the mapping does not know
        (and so cannot classify) never leak into an export.
        """
        if self._reflected:
            return
        with self._lock:
            if self._reflected:
                return
            md = sa.MetaData(schema=self.schema)
            reflected: dict[str, sa.Table] = {}
            for name, declared in self._tables.items():
                try:
                    table = sa.Table(name, md, autoload_with=conn)
                except sa_exc.NoSuchTableError:
                    reflected[name] = declared
                    continue
                if set(declared.c.keys()) <= set(table.c.keys()):
                    reflected[name] = table
                else:
                    reflected[name] = declared
            self._tables = reflected
            self._reflected = True

    def _select(self, conn: Connection, table: str, where: Any) -> list[Row]:
        t = self._tables[table]
        columns = [t.c[c] for c in self.mapping.tables[table].all_columns]
        result = conn.execute(sa.select(*columns).where(where))
        return [dict(r) for r in result.mappings()]

    def _select_in(
        self, conn: Connection, table: str, column: str, values: Iterable[Any]
    ) -> list[Row]:
        col = self._tables[table].c[column]
        rows: list[Row] = []
        for batch in batched(sorted(values, key=_sort_key), self.batch_size):
            rows.extend(self._select(conn, table, col.in_(batch)))
        return rows

    def _collect(self, conn: Connection, identity: Identity) -> _Found:
        """The person's rows (a batch of one, see `_collect_many`)."""
        return self._collect_many(conn, [identity])[0]

    def _collect_many(self, conn: Connection, identities: Sequence[Identity]) -> list[_Found]:
        """Each person's rows: identity matches, then owner references to any depth.

        The batch is read together: one query per table and level (batched `IN`) for all
        the people at once, never one per person or per row. Each person's rows are
        gathered level by level exactly as if they were read alone, so a row that two
        people of the batch reach is in both their results, with the `via` each took.
        """
        tables = self.mapping.tables
        found = [
            _Found(defaultdict(dict), defaultdict(dict), defaultdict(set), None) for _ in identities
        ]
        frontiers: list[dict[str, set[Any]]] = [defaultdict(set) for _ in identities]
        emails = [normalize_email(i.email) if i.email else "" for i in identities]
        product_ids = [i.product_ids.get(self.name) for i in identities]
        for tm in tables.values():
            if not tm.is_identity:
                continue
            t = self._tables[tm.name]
            lookups: list[_Lookup] = []
            if tm.email_column:
                by_email = _Lookup(sa.func.lower(sa.func.trim(t.c[tm.email_column])))
                for n, email in enumerate(emails):
                    if email:
                        by_email.add(email, n)
                lookups.append(by_email)
            if tm.user_id_column:
                id_column = t.c[tm.user_id_column]
                by_id = _Lookup(id_column)
                for n, product_id in enumerate(product_ids):
                    typed = _typed_id(id_column, product_id) if product_id else None
                    if typed is not None:
                        by_id.add(typed, n)
                lookups.append(by_id)
            for n, rows in self._select_for(conn, tm.name, lookups).items():
                person, frontier = found[n], frontiers[n]
                # in key order, so the row that names the user id never depends on the plan
                for pk in sorted(rows, key=_sort_key):
                    row = rows[pk]
                    person.rows[tm.name][pk] = row
                    person.via[tm.name][pk] = "identity"
                    frontier[tm.name].add(pk)
                    if (
                        tm.strategy == "anonymize"
                        and tm.email_column
                        and ANONYMIZED_EMAIL.match(str(row.get(tm.email_column) or ""))
                    ):
                        person.hidden[tm.name].add(pk)
                    elif person.user_id is None and tm.user_id_column:
                        person.user_id = str(row[tm.user_id_column])
        while any(frontiers):
            next_frontiers: list[dict[str, set[Any]]] = [defaultdict(set) for _ in identities]
            for tm in tables.values():
                for ref in tm.owner_references:
                    parents = _Lookup(self._tables[tm.name].c[ref.column])
                    for n, frontier in enumerate(frontiers):
                        keys = frontier.get(ref.target_table)
                        if not keys:
                            continue
                        parent_rows = found[n].rows[ref.target_table]
                        for value in {parent_rows[pk][ref.target_column] for pk in keys} - {None}:
                            parents.add(value, n)
                    for n, rows in self._select_for(conn, tm.name, [parents]).items():
                        person, mine = found[n], found[n].rows[tm.name]
                        for pk, row in rows.items():
                            if pk not in mine:
                                mine[pk] = row
                                person.via[tm.name][pk] = ref.label
                                next_frontiers[n][tm.name].add(pk)
            frontiers = next_frontiers
        return found

    def _select_for(
        self, conn: Connection, table: str, lookups: Sequence[_Lookup]
    ) -> dict[int, dict[Any, Row]]:
        """The rows of `table` each person of a batch looks for: person -> key -> row.

        One query per `batch_size` values for the whole batch. Each row comes back with
        the values the database compared, which say whose it is: everyone who asked for
        one of them. Under a lenient comparison (a case- or accent-insensitive collation,
        trailing spaces ignored) that is not the whole answer: two people's different
        values may be one to the database, so a row holding exactly one of them belongs
        to both. People whose values may be so confused (`_Lookup.confusable_people`)
        are read alone, the others together; and a row whose owners cannot all be told
        (it matched a value nobody asked for as such: a text id compared with a number,
        a look-alike under a lenient collation) has the table read person by person. So
        a batch finds for each person exactly what reading them alone finds.
        """
        lookups = [lk for lk in lookups if lk.wanted]
        people = set().union(*(lk.people for lk in lookups))
        apart: set[int] = set()
        if len(people) > 1:
            apart = set().union(*(lk.confusable_people() for lk in lookups))
        together = [lk.without(apart) for lk in lookups] if apart else lookups
        found = self._select_together(conn, table, [lk for lk in together if lk.wanted])
        if found is None:
            found, apart = {}, people
        for n in sorted(apart):
            found[n] = self._select_one(conn, table, lookups, n)
        return found

    def _select_together(
        self, conn: Connection, table: str, lookups: Sequence[_Lookup]
    ) -> dict[int, dict[Any, Row]] | None:
        """Each person's rows, told apart by the values the database compared; None if a
        row may have matched someone on a value nobody asked for as such."""
        people = sorted(set().union(*(lk.people for lk in lookups)))
        found: dict[int, dict[Any, Row]] = {n: {} for n in people}
        pk = self.mapping.tables[table].primary_key
        for row, compared in self._matches(conn, table, lookups):
            owners = people if len(people) == 1 else _owners(lookups, compared)
            if owners is None:
                return None
            for n in owners:
                found[n][row[pk]] = row
        return found

    def _matches(
        self, conn: Connection, table: str, lookups: Sequence[_Lookup]
    ) -> Iterator[tuple[Row, tuple[Any, ...]]]:
        """The rows of `table` any lookup matches, each with the values compared."""
        if not lookups:
            return
        t = self._tables[table]
        names = self.mapping.tables[table].all_columns
        width = len(names)
        columns = [
            *(t.c[c] for c in names),
            *(lk.column.label(f"_lookup_{i}") for i, lk in enumerate(lookups)),
        ]
        chunks = [
            list(batched(sorted(lk.wanted, key=_sort_key), self.batch_size)) for lk in lookups
        ]
        for i in range(max(len(c) for c in chunks)):
            where = sa.or_(
                *(lk.column.in_(c[i]) for lk, c in zip(lookups, chunks, strict=True) if i < len(c))
            )
            for record in conn.execute(sa.select(*columns).where(where)):
                yield dict(zip(names, record[:width], strict=True)), tuple(record[width:])

    def _select_one(
        self, conn: Connection, table: str, lookups: Sequence[_Lookup], person: int
    ) -> dict[Any, Row]:
        """What one person of a batch looks for in `table`, asked for them alone."""
        theirs = [lk.of(person) for lk in lookups]
        return self._select_for(conn, table, theirs).get(person, {})

    # ------------------------------------------------------------- contract

    def locate(self, identity: Identity) -> LocateResult:
        return self.locate_many([identity])[0]

    def export(self, identity: Identity) -> StoreExport:
        return self.export_many([identity])[0]

    def locate_many(self, identities: Sequence[Identity]) -> list[LocateResult]:
        """`locate` for a batch of people, read in one transaction (`BatchReads`)."""
        if not identities:
            return []
        with self._transaction() as conn:
            found = self._collect_many(conn, identities)
        results = [self._located(person) for person in found]
        log.info(
            "store_located",
            store=self.name,
            people=len(results),
            records=sum(len(r.records) for r in results),
        )
        return results

    def export_many(self, identities: Sequence[Identity]) -> list[StoreExport]:
        """`export` for a batch of people, read in one transaction (`BatchReads`)."""
        if not identities:
            return []
        with self._transaction() as conn:
            found = self._collect_many(conn, identities)
        results = [self._exported(person) for person in found]
        log.info(
            "store_exported",
            store=self.name,
            people=len(results),
            tables=sum(len(r.records) for r in results),
        )
        return results

    def _located(self, found: _Found) -> LocateResult:
        records: list[RecordRef] = []
        for tm in self.mapping.tables.values():
            visible = found.visible(tm.name)
            for pk in sorted(visible, key=_sort_key):
                records.append(
                    RecordRef(
                        collection=tm.name,
                        key=str(pk),
                        via=found.via[tm.name][pk],
                        retained=tm.strategy == "retain",
                    )
                )
        discovered = {self.name: found.user_id} if found.user_id else {}
        return LocateResult(store=self.name, records=tuple(records), discovered_ids=discovered)

    def _exported(self, found: _Found) -> StoreExport:
        """The person's visible rows, secrets left out and references to other people's
        identity rows (not among the person's own) redacted."""
        tables = self.mapping.tables
        own_values: dict[tuple[str, str], set[Any]] = {}
        for tm in tables.values():
            for ref in tm.references:
                target = tables[ref.target_table]
                if target.is_identity:
                    key = (target.name, ref.target_column)
                    own_values.setdefault(
                        key, {r[ref.target_column] for r in found.rows[target.name].values()}
                    )
        records: dict[str, list[dict[str, Any]]] = {}
        for tm in tables.values():
            visible = found.visible(tm.name)
            if not visible:
                continue
            redact = {
                ref.column: own_values[(ref.target_table, ref.target_column)]
                for ref in tm.references
                if (ref.target_table, ref.target_column) in own_values
            }
            out: list[dict[str, Any]] = []
            for pk in sorted(visible, key=_sort_key):
                row = visible[pk]
                item: dict[str, Any] = {}
                for column in tm.all_columns:
                    if column in tm.secret:
                        continue
                    value = row.get(column)
                    if column in redact and value is not None and value not in redact[column]:
                        item[column] = REDACTED
                    else:
                        item[column] = json_safe(value)
                out.append(item)
            records[tm.name] = out
        return StoreExport(store=self.name, records=records)

    def correct(self, identity: Identity, corrections: tuple[Correction, ...]) -> CorrectionResult:
        if Capability.CORRECT not in self.capabilities:
            raise UnsupportedAction(f"store {self.name!r} holds no correctable fields")
        held: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for tm in self.mapping.tables.values():
            for field_name, column in tm.correctable.items():
                held[field_name].append((tm.name, column))
        not_held = tuple(dict.fromkeys(c.field for c in corrections if c.field not in held))
        wanted = {c.field: validate_correction(c) for c in corrections if c.field in held}
        changes: list[FieldChange] = []
        with self._transaction() as conn:
            found = self._collect(conn, identity)
            for field_name, value in wanted.items():
                for table, column in held[field_name]:
                    tm = self.mapping.tables[table]
                    t = self._tables[table]
                    stale = {
                        pk: row[column]
                        for pk, row in found.visible(table).items()
                        if row[column] is None or str(row[column]) != value
                    }
                    for batch in batched(sorted(stale, key=_sort_key), self.batch_size):
                        conn.execute(
                            sa.update(t)
                            .where(t.c[tm.primary_key].in_(batch))
                            .values({column: value})
                        )
                    changes.extend(
                        FieldChange(
                            collection=table,
                            key=str(pk),
                            field=field_name,
                            before=None if before is None else str(before),
                            after=value,
                        )
                        for pk, before in sorted(stale.items(), key=lambda kv: _sort_key(kv[0]))
                    )
        log.info("store_corrected", store=self.name, changes=len(changes), not_held=len(not_held))
        return CorrectionResult(store=self.name, applied=tuple(changes), not_held=not_held)

    def plan_erasure(self, identity: Identity) -> ErasureSteps:
        """What `erase` would do for this person, found with SELECTs only (the dry run)."""
        with self._transaction() as conn:
            return self._plan_erasure(conn, self._collect(conn, identity))

    def _plan_erasure(self, conn: Connection, found: _Found) -> ErasureSteps:
        tables = self.mapping.tables
        steps = ErasureSteps()
        for tm in tables.values():
            rows = found.visible(tm.name)
            if rows and tm.strategy == "anonymize":
                steps.anonymize[tm.name] = rows
            if rows and tm.strategy == "delete":
                steps.delete[tm.name] = dict(rows)
            if tm.strategy == "retain" and found.rows.get(tm.name):
                steps.retained.append(
                    Retention(tm.name, len(found.rows[tm.name]), tm.legal_basis, tm.period)
                )
        # others' rows that hang on the deleted ones: removed with them, or unlinked
        doomed: dict[str, dict[Any, Row]] = defaultdict(dict)
        for table, rows in steps.delete.items():
            doomed[table].update(rows)
        for parent in reversed(self.mapping.erase_order):  # parents first
            if not doomed.get(parent):
                continue
            for ref in self.mapping.references_into(parent):
                values = {row[ref.target_column] for row in doomed[parent].values()} - {None}
                child = tables[ref.table]
                for row in self._select_in(conn, child.name, ref.column, values):
                    pk = row[child.primary_key]
                    if pk in doomed[child.name] or pk in found.rows.get(child.name, {}):
                        continue
                    if ref.on_parent_erase == "null":
                        steps.unlink.setdefault((child.name, ref.column), set()).add(pk)
                    else:
                        doomed[child.name][pk] = row
                        steps.dependents.setdefault(child.name, {})[pk] = row
        return steps

    def erase(self, identity: Identity) -> ErasureResult:
        tables = self.mapping.tables
        salt = os.urandom(16)
        with self._transaction() as conn:
            steps = self._plan_erasure(conn, self._collect(conn, identity))
            # 1. anonymize in place (this also nulls owner references to deleted parents)
            for table, rows in steps.anonymize.items():
                tm = tables[table]
                t = self._tables[table]
                stmt = (
                    sa.update(t)
                    .where(t.c[tm.primary_key] == sa.bindparam("_pk"))
                    .values({c: sa.bindparam(f"_v_{c}") for c in tm.anonymize})
                )
                params = [
                    {
                        "_pk": pk,
                        **{
                            f"_v_{c}": _anonymized(kind, salt, tm.name, pk)
                            for c, kind in tm.anonymize.items()
                        },
                    }
                    for pk in sorted(rows, key=_sort_key)
                ]
                for batch in batched(params, self.batch_size):
                    conn.execute(stmt, batch)
            # 2. unlink others' rows that only point at a deleted row
            for (table, column), pks in steps.unlink.items():
                t = self._tables[table]
                pk_col = t.c[tables[table].primary_key]
                for batch in batched(sorted(pks, key=_sort_key), self.batch_size):
                    conn.execute(sa.update(t).where(pk_col.in_(batch)).values({column: None}))
            # 3. delete, children before parents
            for table in self.mapping.erase_order:
                victims = {**steps.delete.get(table, {}), **steps.dependents.get(table, {})}
                if not victims:
                    continue
                t = self._tables[table]
                pk_col = t.c[tables[table].primary_key]
                for batch in batched(sorted(victims, key=_sort_key), self.batch_size):
                    conn.execute(sa.delete(t).where(pk_col.in_(batch)))
        counts = steps.counts()
        log.info(
            "store_erased",
            store=self.name,
            deleted=counts["deleted"],
            anonymized=counts["anonymized"],
            dependents_removed=counts["dependents"],
            nulled=counts["unlinked"],
            retained=sum(r.count for r in steps.retained),
        )
        return ErasureResult(
            store=self.name,
            deleted=counts["deleted"],
            anonymized=counts["anonymized"],
            retained=tuple(steps.retained),
        )

    def opt_out(self, identity: Identity) -> OptOutResult:
        if Capability.OPT_OUT not in self.capabilities:
            raise UnsupportedAction(f"store {self.name!r} keeps no contact preference")
        updated = 0
        with self._transaction() as conn:
            found = self._collect(conn, identity)
            for tm in self.mapping.tables.values():
                if not tm.contact_column:
                    continue
                rows = found.visible(tm.name)
                t = self._tables[tm.name]
                col = t.c[tm.contact_column]
                for batch in batched(sorted(rows, key=_sort_key), self.batch_size):
                    result = conn.execute(
                        sa.update(t)
                        .where(t.c[tm.primary_key].in_(batch))
                        .where(sa.or_(col.is_(None), col != tm.opted_out_value))
                        .values({tm.contact_column: tm.opted_out_value})
                    )
                    updated += max(result.rowcount, 0)
        log.info("store_opted_out", store=self.name, updated=updated)
        return OptOutResult(store=self.name, updated=updated)

    def health(self) -> Health:
        """Reachable, and every declared table and column exists.

        Returns `ok=False` with the reason instead of raising, so a dashboard can
        show it; undeclared columns are reported because they are never exported.
        """
        try:
            with self._transaction() as conn:
                conn.execute(sa.text("SELECT 1"))
                inspector = sa.inspect(conn)
                problems: list[str] = []
                for tm in self.mapping.tables.values():
                    if not inspector.has_table(tm.name, schema=self.schema):
                        problems.append(f"table {tm.name} is missing")
                        continue
                    actual = {c["name"] for c in inspector.get_columns(tm.name, schema=self.schema)}
                    missing = [c for c in tm.all_columns if c not in actual]
                    extra = sorted(actual - set(tm.all_columns))
                    if missing:
                        problems.append(f"table {tm.name} lacks columns {missing}")
                    if extra and tm.person_data:
                        problems.append(f"table {tm.name} has undeclared columns {extra}")
        except StoreUnavailable as exc:
            return Health(ok=False, detail=str(exc))
        if any("missing" in p or "lacks" in p for p in problems):
            return Health(ok=False, detail="; ".join(problems))
        return Health(ok=True, detail="; ".join(problems))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def validate_correction(correction: Correction) -> str:
    """The value to store, or `InvalidCorrection` saying exactly what is wrong."""
    value = correction.value.strip() if isinstance(correction.value, str) else ""
    name = correction.field
    if not value:
        raise InvalidCorrection(f"{name}: the new value is empty")
    limit = MAX_LENGTH.get(name, DEFAULT_MAX_LENGTH)
    if len(value) > limit:
        raise InvalidCorrection(f"{name}: the new value is longer than {limit} characters")
    if name == "email" and not EMAIL.match(value):
        raise InvalidCorrection("email: the new value is not an email address (name@domain.tld)")
    if name == "phone" and not PHONE.match(value):
        raise InvalidCorrection(
            "phone: the new value may hold only digits, spaces, hyphens and a leading +"
        )
    return value


def _anonymized(kind: str, salt: bytes, table: str, pk: Any) -> str | None:
    """A replacement that cannot be traced back: keyed by a salt drawn for this erasure."""
    digest = hashlib.sha256(salt + f"{table}\x00{pk}".encode()).hexdigest()[:16]
    if kind == "email":
        return f"erased-{digest}@invalid.example"
    if kind == "hash":
        return f"erased-{digest}"
    if kind == "redact":
        return ERASED_TEXT
    return None


def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    """SQLite ignores foreign keys unless asked; enforce them so order mistakes show."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


__all__: Sequence[str] = ["SqlConnector", "SqlMapping", "TableMapping", "Reference", "json_safe"]
