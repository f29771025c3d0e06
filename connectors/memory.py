"""In-memory reference connector: the contract, implemented as plainly as possible.

It is the fake the pipeline's tests use instead of real stores (like httpx's
`MockTransport`), and the example a product team reads first. It can be told to fail
(`down = True` or `fail_next`) so tests can exercise retries and "needs attention".
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

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
from connectors.sql import validate_correction

log = structlog.get_logger()

PEOPLE = "people"
DEFAULT_CORRECTABLE = frozenset({"name", "email", "phone", "job_title"})


def _default_facts(collections: Iterable[str]) -> dict[str, DataFacts]:
    return {
        c: DataFacts(
            purpose="Test data for the privacy-request pipeline",
            categories=("identifiers", "contact details") if c == PEOPLE else ("activity",),
            recipients=("none",),
            retention="Until the test ends",
            source="Provided by the test",
        )
        for c in collections
    }


class MemoryConnector:
    """People as dicts, records as dicts owned by a person id.

    `people` rows need `id` and `email`; other keys (`name`, `phone`, ...) are
    profile fields. `records` maps a collection to rows with an `id` and an `owner`
    (the person id). `retain` maps a collection to (legal basis, period): its rows are
    kept on erasure. `secret_fields` are never exported. `contact_field` is set to
    False on opt-out.
    """

    def __init__(
        self,
        name: str,
        people: Iterable[Mapping[str, Any]] = (),
        records: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
        *,
        title: str | None = None,
        description: str = "In-memory store (reference connector)",
        facts: Mapping[str, DataFacts] | None = None,
        retain: Mapping[str, tuple[str, str]] | None = None,
        secret_fields: Iterable[str] = ("password_hash",),
        correctable_fields: Iterable[str] = DEFAULT_CORRECTABLE,
        contact_field: str = "contact_ok",
        capabilities: Iterable[Capability] | None = None,
    ) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.people: list[dict[str, Any]] = [dict(p) for p in people]
        self.records: dict[str, list[dict[str, Any]]] = {
            c: [dict(r) for r in rows] for c, rows in (records or {}).items()
        }
        self.retain = dict(retain or {})
        self.secret_fields = frozenset(secret_fields)
        self.contact_field = contact_field
        self.correctable_fields = frozenset(correctable_fields)
        self.capabilities = (
            frozenset(capabilities) if capabilities is not None else frozenset(Capability)
        )
        collections = [PEOPLE, *self.records]
        self.metadata = StoreMetadata(
            name=name,
            title=title or name,
            description=description,
            facts=dict(facts) if facts is not None else _default_facts(collections),
        )
        self.down = False
        self.delay_s = 0.0  # a slow store: every call waits this long first
        self._failures: list[ConnectorError] = []
        self.calls: list[str] = []  # method names, in order: lets tests assert idempotency
        self.closed = False

    @classmethod
    def from_config(cls, name: str, settings: Mapping[str, Any], data_dir: Path) -> MemoryConnector:
        people = settings.get("people", [])
        records = settings.get("records", {})
        if not isinstance(people, list) or not isinstance(records, Mapping):
            raise MappingError(
                f"store {name!r}: `people` must be an array of tables and `records` a table "
                "of arrays; fix the store configuration"
            )
        retain = {
            k: (str(v["legal_basis"]), str(v["period"]))
            for k, v in dict(settings.get("retain", {})).items()
        }
        return cls(
            name,
            people,
            records,
            title=settings.get("title"),
            description=settings.get("description", "In-memory store (reference connector)"),
            retain=retain,
        )

    # ------------------------------------------------------------- test hooks

    def fail_next(self, n: int = 1, exc: ConnectorError | None = None) -> None:
        """Make the next `n` calls raise `exc` (default `StoreUnavailable`)."""
        error = exc or StoreUnavailable(f"store {self.name!r} is down (simulated)")
        self._failures.extend([error] * n)

    def _enter(self, method: str, capability: Capability | None = None) -> None:
        self.calls.append(method)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down:
            raise StoreUnavailable(f"store {self.name!r} is down (simulated)")
        if self._failures:
            raise self._failures.pop(0)
        if capability is not None and capability not in self.capabilities:
            raise UnsupportedAction(f"store {self.name!r} does not support {capability.value}")

    # ------------------------------------------------------------- contract

    def _matches(self, identity: Identity) -> list[dict[str, Any]]:
        email = identity.email.strip().lower() if identity.email else ""
        product_id = identity.product_ids.get(self.name)
        return [
            p
            for p in self.people
            if (email and str(p.get("email", "")).strip().lower() == email)
            or (product_id is not None and str(p.get("id")) == product_id)
        ]

    def _owned(
        self, identity: Identity
    ) -> tuple[list[dict[str, Any]], set[str], dict[str, list[dict[str, Any]]]]:
        people = self._matches(identity)
        ids = {str(p["id"]) for p in people}
        if product_id := identity.product_ids.get(self.name):
            ids.add(product_id)  # retained rows outlive the person's profile
        owned = {
            c: [r for r in rows if str(r.get("owner")) in ids] for c, rows in self.records.items()
        }
        return people, ids, owned

    def locate(self, identity: Identity) -> LocateResult:
        with self._lock:
            self._enter("locate", Capability.LOCATE)
            people, _, owned = self._owned(identity)
            refs = [RecordRef(PEOPLE, str(p["id"])) for p in people]
            for collection, rows in owned.items():
                refs.extend(
                    RecordRef(
                        collection,
                        str(r["id"]),
                        via=f"{collection}.owner",
                        retained=collection in self.retain,
                    )
                    for r in rows
                )
            discovered = {self.name: str(people[0]["id"])} if people else {}
            return LocateResult(self.name, tuple(refs), discovered)

    def export(self, identity: Identity) -> StoreExport:
        with self._lock:
            self._enter("export", Capability.EXPORT)
            people, _, owned = self._owned(identity)
            out: dict[str, list[dict[str, Any]]] = {}
            if people:
                out[PEOPLE] = [self._public(p) for p in people]
            for collection, rows in owned.items():
                if rows:
                    out[collection] = [self._public(r) for r in rows]
            return StoreExport(self.name, out)

    def _public(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in row.items() if k not in self.secret_fields}

    def correct(self, identity: Identity, corrections: tuple[Correction, ...]) -> CorrectionResult:
        with self._lock:
            self._enter("correct", Capability.CORRECT)
            not_held = tuple(
                dict.fromkeys(
                    c.field for c in corrections if c.field not in self.correctable_fields
                )
            )
            wanted = {
                c.field: validate_correction(c)
                for c in corrections
                if c.field in self.correctable_fields
            }
            changes: list[FieldChange] = []
            for person in self._matches(identity):
                for field_name, value in wanted.items():
                    before = person.get(field_name)
                    if before != value:
                        person[field_name] = value
                        changes.append(
                            FieldChange(
                                PEOPLE,
                                str(person["id"]),
                                field_name,
                                None if before is None else str(before),
                                value,
                            )
                        )
            return CorrectionResult(self.name, tuple(changes), not_held)

    def erase(self, identity: Identity) -> ErasureResult:
        with self._lock:
            self._enter("erase", Capability.ERASE)
            people, ids, owned = self._owned(identity)
            deleted = len(people)
            self.people = [
                p for p in self.people if str(p["id"]) not in {str(q["id"]) for q in people}
            ]
            retained: list[Retention] = []
            for collection, rows in owned.items():
                if collection in self.retain:
                    if rows:
                        basis, period = self.retain[collection]
                        retained.append(Retention(collection, len(rows), basis, period))
                    continue
                deleted += len(rows)
                self.records[collection] = [
                    r for r in self.records[collection] if str(r.get("owner")) not in ids
                ]
            log.info("store_erased", store=self.name, deleted=deleted)
            return ErasureResult(self.name, deleted=deleted, anonymized=0, retained=tuple(retained))

    def opt_out(self, identity: Identity) -> OptOutResult:
        with self._lock:
            self._enter("opt_out", Capability.OPT_OUT)
            updated = 0
            for person in self._matches(identity):
                if person.get(self.contact_field) is not False:
                    person[self.contact_field] = False
                    updated += 1
            return OptOutResult(self.name, updated)

    def health(self) -> Health:
        self.calls.append("health")
        if self.down:
            return Health(ok=False, detail="down (simulated)")
        return Health(ok=True)

    def close(self) -> None:
        self.closed = True
