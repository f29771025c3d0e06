"""Dry run: what a connector would export and erase for one person, changing nothing.

Locate and export only read, so they run as they are. An erasure is *planned*: the SQL
connector works out, with SELECTs only, every row its `erase` would delete, unlink,
anonymize or keep; the files, HTTP and memory connectors erase exactly what `locate`
reports as erasable, so their plan is the located records. A custom connector can
offer `plan_erasure(identity) -> ErasurePlan`; one that offers no plan is refused
rather than guessed about.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from connectors.base import Capability, Connector, ConnectorError, Identity, LocateResult
from connectors.files import FilesConnector
from connectors.http import HttpConnector
from connectors.memory import MemoryConnector
from connectors.sql import SqlConnector


class CannotPlan(ConnectorError):
    """The connector cannot say what an erasure would do without doing it."""


@dataclass(frozen=True)
class Kept:
    count: int
    legal_basis: str
    period: str


@dataclass
class ErasurePlan:
    """Per collection: what an erasure would do. Counts only, never values."""

    delete: dict[str, int] = field(default_factory=dict)  # the person's records
    dependents: dict[str, int] = field(default_factory=dict)  # others' rows deleted with them
    unlink: dict[str, int] = field(default_factory=dict)  # "table.column" set to NULL
    anonymize: dict[str, int] = field(default_factory=dict)
    retain: dict[str, Kept] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delete": self.delete,
            "dependents": self.dependents,
            "unlink": self.unlink,
            "anonymize": self.anonymize,
            "retain": {
                k: {"count": v.count, "legal_basis": v.legal_basis, "period": v.period}
                for k, v in self.retain.items()
            },
        }


@dataclass
class DryRun:
    store: str
    located: dict[str, int]
    retained: int
    export: dict[str, dict[str, Any]] | None  # collection -> {"rows": n, "fields": [...]}
    erase: ErasurePlan | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "located": self.located,
            "retained": self.retained,
            "export": self.export,
            "erase": self.erase.as_dict() if self.erase else None,
        }


def plan_sql_erasure(c: SqlConnector, identity: Identity) -> ErasurePlan:
    """The rows `SqlConnector.erase` would touch, from the same plan it executes."""
    steps = c.plan_erasure(identity)
    return ErasurePlan(
        delete={t: len(rows) for t, rows in steps.delete.items()},
        dependents={t: len(rows) for t, rows in steps.dependents.items()},
        unlink={f"{t}.{col}": len(pks) for (t, col), pks in sorted(steps.unlink.items())},
        anonymize={t: len(rows) for t, rows in steps.anonymize.items()},
        retain={r.collection: Kept(r.count, r.legal_basis, r.period) for r in steps.retained},
    )


def _legal_basis(connector: Connector, collection: str) -> tuple[str, str]:
    if isinstance(connector, MemoryConnector) and collection in connector.retain:
        return connector.retain[collection]
    if isinstance(connector, HttpConnector) and collection in connector.mapping.collections:
        spec = connector.mapping.collections[collection]
        return spec.legal_basis, spec.period
    return "declared by the store on erasure", ""


def plan_from_locate(connector: Connector, found: LocateResult) -> ErasurePlan:
    """For connectors whose erase removes exactly the erasable records locate reports."""
    plan = ErasurePlan(delete=dict(Counter(r.collection for r in found.erasable)))
    for collection, count in sorted(Counter(r.collection for r in found.retained).items()):
        basis, period = _legal_basis(connector, collection)
        plan.retain[collection] = Kept(count, basis, period)
    return plan


LOCATE_PLANNED = (FilesConnector, MemoryConnector, HttpConnector)


def dry_run(connector: Connector, identity: Identity) -> DryRun:
    """Locate, preview the export and plan the erasure; raise `CannotPlan` before doing
    anything if the erasure cannot be planned without acting."""
    custom = getattr(connector, "plan_erasure", None)
    erasable = Capability.ERASE in connector.capabilities
    if (
        erasable
        and not isinstance(connector, (SqlConnector, *LOCATE_PLANNED))
        and not callable(custom)
    ):
        raise CannotPlan(
            f"store {connector.name!r} ({type(connector).__name__}) cannot plan an erasure "
            "without acting: it offers no plan_erasure(identity); dry-run refuses"
        )
    found = connector.locate(identity)
    who = Identity(
        email=identity.email,
        name=identity.name,
        phone=identity.phone,
        product_ids={**dict(found.discovered_ids), **dict(identity.product_ids)},
    )
    export: dict[str, dict[str, Any]] | None = None
    if Capability.EXPORT in connector.capabilities:
        exported = connector.export(who)
        export = {
            collection: {
                "rows": len(rows),
                "fields": sorted({str(k) for row in rows for k in row}),
            }
            for collection, rows in exported.records.items()
            if rows
        }
        if exported.attachments:
            export["(files)"] = {
                "rows": len(exported.attachments),
                "fields": [f"{sum(a.size for a in exported.attachments)} bytes"],
            }
    plan: ErasurePlan | None = None
    if erasable:
        if isinstance(connector, SqlConnector):
            plan = plan_sql_erasure(connector, who)
        elif isinstance(connector, LOCATE_PLANNED):
            plan = plan_from_locate(connector, connector.locate(who))
        else:
            planned = custom(who) if callable(custom) else None
            if not isinstance(planned, ErasurePlan):
                raise CannotPlan(f"store {connector.name!r}: plan_erasure returned no plan")
            plan = planned
    return DryRun(
        store=connector.name,
        located=dict(Counter(r.collection for r in found.records)),
        retained=len(found.retained),
        export=export,
        erase=plan,
    )
