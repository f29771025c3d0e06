"""The connector contract: how the pipeline reaches a product store.

A connector takes and returns plain value types only. It knows nothing of dramatiq,
the state database or the request's lifecycle, so a product team can write and test
one against its own store alone. The pipeline calls each method from a worker thread;
one call may block on the store without holding back the other stores, which run in
their own messages.

A store message carries a batch of requests. A connector MAY also implement `BatchReads`
(`locate_many`, `export_many`) to read for the whole batch at once; the pipeline calls
`locate_each` / `export_each`, which use it when present and else call `locate` /
`export` once per person, so connectors without it keep working unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, TypeVar, runtime_checkable


class Capability(enum.StrEnum):
    """What a store can do for a person. A store declares the ones it supports."""

    LOCATE = "locate"
    EXPORT = "export"
    CORRECT = "correct"
    ERASE = "erase"
    OPT_OUT = "opt_out"


class ConnectorError(Exception):
    """Base of every error a connector raises."""


class StoreUnavailable(ConnectorError):
    """The store could not be reached or answered with a failure: try again later."""


class UnsupportedAction(ConnectorError):
    """The store does not support this action (see its declared capabilities)."""


class InvalidCorrection(ConnectorError):
    """A correction names a field the store does not hold or a value it refuses."""


class MappingError(ConnectorError):
    """The connector's configuration is wrong; raised when it is loaded, never mid-request."""


@dataclass(frozen=True)
class Identity:
    """Everything known about who the person is.

    `product_ids` maps a store name to the person's user id in that store; a connector
    uses the entry for its own store name (and may use others it declares it links to).
    """

    email: str
    name: str | None = None
    phone: str | None = None
    product_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataFacts:
    """GDPR Art. 15 facts about one table, collection or folder of a store."""

    purpose: str
    categories: tuple[str, ...]
    recipients: tuple[str, ...]
    retention: str
    source: str
    automated_decisions: str = "none"


@dataclass(frozen=True)
class StoreMetadata:
    """What a store is and what it holds, for the access response and operators."""

    name: str
    title: str
    description: str
    facts: Mapping[str, DataFacts]  # by table / collection name
    field_categories: Mapping[str, str] = field(default_factory=dict)  # "table.column" -> category


@dataclass(frozen=True)
class RecordRef:
    """One record of the person's in a store: where it is and how it was reached."""

    collection: str
    key: str
    via: str = "identity"  # "identity" or the reference that led to it, e.g. "videos.owner_id"
    retained: bool = False  # kept on erasure under a legal obligation


@dataclass(frozen=True)
class LocateResult:
    """The person's records in one store. Empty `records` means the store holds nothing."""

    store: str
    records: tuple[RecordRef, ...]
    # identities discovered while locating, e.g. {"video": "u-1042"}; the pipeline may
    # pass them to other stores
    discovered_ids: Mapping[str, str] = field(default_factory=dict)

    @property
    def erasable(self) -> tuple[RecordRef, ...]:
        return tuple(r for r in self.records if not r.retained)

    @property
    def retained(self) -> tuple[RecordRef, ...]:
        return tuple(r for r in self.records if r.retained)


@dataclass(frozen=True)
class Attachment:
    """A file that belongs in the export archive, read as a stream, never whole."""

    name: str  # path inside the store's folder of the archive, e.g. "videos/v1.mp4"
    size: int
    open: Any  # Callable[[], BinaryIO]; kept as Any so the dataclass stays hashable

    def stream(self) -> BinaryIO:
        return self.open()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StoreExport:
    """The person's data in one store, ready to be written into the archive.

    `records` maps a collection name to its rows (JSON-serialisable dicts) with other
    people's data already redacted and secrets (passwords, government ids, full account
    numbers) left out.
    """

    store: str
    records: Mapping[str, list[dict[str, Any]]]
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class Correction:
    field: str  # a personal field name common to stores: name, email, phone, job_title...
    value: str


@dataclass(frozen=True)
class FieldChange:
    """One applied change; values are kept so the pipeline can hash them for the audit."""

    collection: str
    key: str
    field: str
    before: str | None
    after: str


@dataclass(frozen=True)
class CorrectionResult:
    store: str
    applied: tuple[FieldChange, ...]
    not_held: tuple[str, ...] = ()  # requested fields this store does not hold


@dataclass(frozen=True)
class Retention:
    """Records kept on erasure under a legal obligation."""

    collection: str
    count: int
    legal_basis: str
    period: str


@dataclass(frozen=True)
class ErasureResult:
    store: str
    deleted: int
    anonymized: int
    retained: tuple[Retention, ...] = ()


@dataclass(frozen=True)
class OptOutResult:
    store: str
    updated: int


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""


@runtime_checkable
class Connector(Protocol):
    """A product store, as the pipeline sees it.

    Implementations raise `StoreUnavailable` for anything that may pass on retry,
    `UnsupportedAction` for a capability they do not declare, and `InvalidCorrection`
    for a correction they refuse. Every method is idempotent: calling it twice for the
    same person leaves the store as calling it once.
    """

    name: str
    capabilities: frozenset[Capability]
    metadata: StoreMetadata
    correctable_fields: frozenset[str]

    def locate(self, identity: Identity) -> LocateResult: ...

    def export(self, identity: Identity) -> StoreExport: ...

    def correct(
        self, identity: Identity, corrections: tuple[Correction, ...]
    ) -> CorrectionResult: ...

    def erase(self, identity: Identity) -> ErasureResult: ...

    def opt_out(self, identity: Identity) -> OptOutResult: ...

    def health(self) -> Health: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchReads(Protocol):
    """Optional: a connector that reads for many people in one go (one query per table
    for the batch instead of one per person).

    Each method returns one result per identity, in the same order, each exactly what
    `locate(identity)` / `export(identity)` would return for that identity alone, even
    when two identities of the batch share records or are the same person. An error
    fails the whole call; the pipeline then asks person by person.
    """

    def locate_many(self, identities: Sequence[Identity]) -> list[LocateResult]: ...

    def export_many(self, identities: Sequence[Identity]) -> list[StoreExport]: ...


def locate_each(connector: Connector, identities: Sequence[Identity]) -> list[LocateResult]:
    """`locate` for every identity, in one batch call when the connector can."""
    if not identities:
        return []
    if isinstance(connector, BatchReads):
        return _one_each(connector, "locate_many", identities, connector.locate_many(identities))
    return [connector.locate(identity) for identity in identities]


def export_each(connector: Connector, identities: Sequence[Identity]) -> list[StoreExport]:
    """`export` for every identity, in one batch call when the connector can."""
    if not identities:
        return []
    if isinstance(connector, BatchReads):
        return _one_each(connector, "export_many", identities, connector.export_many(identities))
    return [connector.export(identity) for identity in identities]


_R = TypeVar("_R")


def _one_each(
    connector: Connector, method: str, identities: Sequence[Identity], results: list[_R]
) -> list[_R]:
    # a result too many or too few would give one person another's data: refuse it
    if len(results) != len(identities):
        raise ConnectorError(
            f"store {connector.name!r}: {method} returned {len(results)} result(s) "
            f"for {len(identities)} people"
        )
    return results


def iter_chunks(stream: BinaryIO, size: int = 64 * 1024) -> Iterator[bytes]:
    """Read a stream in fixed-size chunks (helper for attachments)."""
    while chunk := stream.read(size):
        yield chunk
