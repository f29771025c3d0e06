"""The kit is worth something only if it fails on broken connectors: each deliberately
broken variant of the reference connector makes the matching check raise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
import structlog

from connectors.base import (
    Capability,
    Correction,
    CorrectionResult,
    ErasureResult,
    Identity,
    LocateResult,
    RecordRef,
    Retention,
    StoreExport,
)
from connectors.memory import MemoryConnector
from connectors.testing import (
    check_batch_reads,
    check_correction,
    check_erase,
    check_export,
    check_locate,
    check_metadata,
    check_no_identity_in_logs,
    check_opt_out,
    check_unsupported_actions,
)
from tests.unit.connectors.kit_seeds import memory_scenario, seeded_memory


class LocatesByName(MemoryConnector):
    """Matches on the name too: the look-alike's records come along."""

    def locate(self, identity: Identity) -> LocateResult:
        found = super().locate(identity)
        extra = tuple(
            RecordRef("people", str(p["id"]))
            for p in self.people
            if p.get("name") == identity.name
            and RecordRef("people", str(p["id"])) not in found.records
        )
        return LocateResult(found.store, found.records + extra, found.discovered_ids)


class LeaksSecrets(MemoryConnector):
    def _public(self, row: Any) -> dict[str, Any]:
        return dict(row)


class ExportsTheLookalike(MemoryConnector):
    def export(self, identity: Identity) -> StoreExport:
        mine = super().export(identity)
        theirs = super().export(Identity("robin.kit@example.org"))
        records = {k: [*mine.records.get(k, []), *v] for k, v in theirs.records.items()}
        return StoreExport(mine.store, {**mine.records, **records})


class ErasesAllButNotes(MemoryConnector):
    """Deletes the profile but forgets the notes: rows of the person's stay."""

    def erase(self, identity: Identity) -> ErasureResult:
        people, _, owned = self._owned(identity)
        gone = {str(p["id"]) for p in people}
        self.people = [p for p in self.people if str(p["id"]) not in gone]
        kept = Retention("invoices", len(owned["invoices"]), "Tax law", "10 years")
        return ErasureResult(self.name, deleted=len(people), anonymized=0, retained=(kept,))


class ErasesTheRetainedInvoices(MemoryConnector):
    def erase(self, identity: Identity) -> ErasureResult:
        result = super().erase(identity)
        self.records["invoices"] = [r for r in self.records["invoices"] if r["id"] != "inv-1"]
        return result


class FailsOnSecondErase(MemoryConnector):
    def erase(self, identity: Identity) -> ErasureResult:
        if "erase" in self.calls:
            raise RuntimeError("already erased")
        return super().erase(identity)


class LogsTheEmailWithStructlog(MemoryConnector):
    def locate(self, identity: Identity) -> LocateResult:
        structlog.get_logger().info("store_located", store=self.name, email=identity.email)
        return super().locate(identity)


class LogsTheNameWithLogging(MemoryConnector):
    def export(self, identity: Identity) -> StoreExport:
        logging.getLogger("product.crm").debug("exporting %s", identity.name)
        return super().export(identity)


class SilentlyIgnoresUnsupported(MemoryConnector):
    """Declares no opt-out, yet opt_out() quietly "succeeds"."""

    def _enter(self, method: str, capability: Capability | None = None) -> None:
        self.calls.append(method)


class ClaimsCorrectionsItDoesNotKeep(MemoryConnector):
    def correct(self, identity: Identity, corrections: tuple[Correction, ...]) -> CorrectionResult:
        people = [dict(p) for p in self.people]
        result = super().correct(identity, corrections)
        self.people = people
        return result


class OptsOutEveryTime(MemoryConnector):
    def opt_out(self, identity: Identity) -> Any:
        result = super().opt_out(identity)
        for person in self.people:
            person[self.contact_field] = True
        return result


class BatchReadsSharingEveryonesRecords(MemoryConnector):
    """Reads a batch at once, but gives each person the records of the whole batch."""

    def locate_many(self, identities: Sequence[Identity]) -> list[LocateResult]:
        alone = [self.locate(i) for i in identities]
        every = tuple(dict.fromkeys(r for found in alone for r in found.records))
        return [LocateResult(f.store, every, f.discovered_ids) for f in alone]

    def export_many(self, identities: Sequence[Identity]) -> list[StoreExport]:
        return [self.export(i) for i in identities]


class BatchExportsInReverse(MemoryConnector):
    """Reads a batch at once, but answers in the wrong order."""

    def locate_many(self, identities: Sequence[Identity]) -> list[LocateResult]:
        return [self.locate(i) for i in identities]

    def export_many(self, identities: Sequence[Identity]) -> list[StoreExport]:
        return [self.export(i) for i in reversed(identities)]


class BatchReadsDone(MemoryConnector):
    """Reads a batch by asking for each person in turn: slow, but right."""

    def locate_many(self, identities: Sequence[Identity]) -> list[LocateResult]:
        return [self.locate(i) for i in identities]

    def export_many(self, identities: Sequence[Identity]) -> list[StoreExport]:
        return [self.export(i) for i in identities]


def test_the_reference_connector_passes_every_check(caplog: pytest.LogCaptureFixture) -> None:
    for check in (
        check_metadata,
        check_locate,
        check_export,
        check_correction,
        check_erase,
        check_opt_out,
        check_unsupported_actions,
        check_batch_reads,
    ):
        check(memory_scenario(seeded_memory()))
    check_batch_reads(memory_scenario(seeded_memory(BatchReadsDone)))
    check_no_identity_in_logs(memory_scenario(seeded_memory()), caplog)


def test_a_locate_that_returns_the_look_alikes_record_fails_the_locate_check() -> None:
    scenario = memory_scenario(seeded_memory(LocatesByName))
    with pytest.raises(AssertionError, match="expected"):
        check_locate(scenario)
    scenario.expected_records = None  # without an oracle, the look-alike check still fails
    with pytest.raises(AssertionError, match=r"includes the look-alike's records \[\('people'"):
        check_locate(scenario)


def test_an_export_leaking_a_secret_column_fails_the_export_check() -> None:
    with pytest.raises(AssertionError, match="secret"):
        check_export(memory_scenario(seeded_memory(LeaksSecrets)))


def test_an_export_with_the_look_alikes_data_fails_the_export_check() -> None:
    with pytest.raises(AssertionError, match="export"):
        check_export(memory_scenario(seeded_memory(ExportsTheLookalike)))


def test_an_erase_that_leaves_a_row_fails_the_erase_check() -> None:
    with pytest.raises(AssertionError, match=r"left erasable record\(s\) \[\('notes'"):
        check_erase(memory_scenario(seeded_memory(ErasesAllButNotes)))


def test_an_erase_that_drops_retained_data_fails_the_erase_check() -> None:
    with pytest.raises(AssertionError, match="retained records changed"):
        check_erase(memory_scenario(seeded_memory(ErasesTheRetainedInvoices)))


def test_an_erase_that_cannot_run_twice_fails_the_erase_check() -> None:
    with pytest.raises(RuntimeError, match="already erased"):
        check_erase(memory_scenario(seeded_memory(FailsOnSecondErase)))


def test_a_connector_logging_the_email_through_structlog_fails_the_log_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(AssertionError, match="identity .* is in the logs"):
        check_no_identity_in_logs(memory_scenario(seeded_memory(LogsTheEmailWithStructlog)), caplog)


def test_a_connector_logging_the_name_through_stdlib_logging_fails_the_log_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(AssertionError, match="identity .* is in the logs"):
        check_no_identity_in_logs(memory_scenario(seeded_memory(LogsTheNameWithLogging)), caplog)


def test_an_undeclared_action_that_silently_succeeds_fails_the_unsupported_check() -> None:
    store = seeded_memory(
        SilentlyIgnoresUnsupported, capabilities={Capability.LOCATE, Capability.EXPORT}
    )
    with pytest.raises(AssertionError, match="instead of raising UnsupportedAction"):
        check_unsupported_actions(memory_scenario(store))


def test_a_correction_that_does_not_stick_fails_the_correction_check() -> None:
    with pytest.raises(AssertionError, match="does not show on re-export"):
        check_correction(memory_scenario(seeded_memory(ClaimsCorrectionsItDoesNotKeep)))


def test_an_opt_out_that_never_settles_fails_the_opt_out_check() -> None:
    with pytest.raises(AssertionError, match="second opt-out"):
        check_opt_out(memory_scenario(seeded_memory(OptsOutEveryTime)))


def test_missing_facts_for_a_located_collection_fail_the_metadata_check() -> None:
    store = seeded_memory()
    store.metadata = type(store.metadata)(
        name="crm",
        title="crm",
        description="",
        facts={k: v for k, v in store.metadata.facts.items() if k != "notes"},
    )
    with pytest.raises(AssertionError, match=r"no Art. 15 facts for collection\(s\) \['notes'\]"):
        check_metadata(memory_scenario(store))


def test_a_batch_read_giving_someone_the_records_of_the_others_fails_the_batch_check() -> None:
    shared = r"locate_many's result 0 differs .*\('people', 'crm-twin-0002'\)"
    with pytest.raises(AssertionError, match=shared):
        check_batch_reads(memory_scenario(seeded_memory(BatchReadsSharingEveryonesRecords)))


def test_a_batch_read_answering_out_of_order_fails_the_batch_check() -> None:
    with pytest.raises(AssertionError, match="export_many's result 1 differs"):
        check_batch_reads(memory_scenario(seeded_memory(BatchExportsInReverse)))
