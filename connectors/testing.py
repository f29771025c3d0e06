"""The connector conformance kit: one base class a product team's tests subclass.

A connector passes when, for a person seeded in its store next to a look-alike (same
name, other email), it finds all of the person's records and none of the look-alike's,
exports only the person's data and never a secret, shows a correction on re-export,
erases idempotently leaving nothing erasable but what the law keeps, refuses what it
does not declare, never writes an identity into the logs, and, if it reads for many
people at once (`BatchReads`), answers for each of a batch as for them alone::

    from connectors.testing import ConnectorContract, Scenario

    class TestMyStore(ConnectorContract):
        def make_scenario(self, tmp_path):
            store = build_and_seed_my_store(tmp_path)        # your code
            return Scenario(
                connector=MyConnector("mystore", ...),
                person=Identity("robin.kit@example.com", name="Robin Kit"),
                lookalike=Identity("robin.kit@example.org", name="Robin Kit"),
                secret_values=("argon2$the-seeded-hash",),
            )

A test that needs other fixtures (a database server, an HTTP service) overrides the
`scenario` fixture instead of `make_scenario`. Each check is also a plain function
(`check_locate`, `check_export`, ...) raising `AssertionError` with what is wrong, so
a team can call one on its own, and so the kit's own tests can prove each check fails
on a broken connector.

Every check runs against a freshly seeded store (the fixture is per test), and uses
the identity the pipeline would use: the person's, plus the ids `locate` discovered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from connectors.base import (
    BatchReads,
    Capability,
    Connector,
    Correction,
    Identity,
    LocateResult,
    StoreExport,
    UnsupportedAction,
)
from connectors.registry import validate_connector

# Corrections the kit tries, in order, on the first field the store can correct.
DEFAULT_CORRECTIONS: tuple[Correction, ...] = (
    Correction("job_title", "Kit Corrected Title"),
    Correction("phone", "+1 555 0199"),
    Correction("name", "Kit Corrected Name"),
    Correction("company", "Kit Corrected Company"),
    Correction("email", "kit.corrected@example.net"),
)
# Identity strings shorter than this are not searched for in logs: "7" is in every line.
MIN_TERM_LENGTH = 4

Ref = tuple[str, str]  # (collection, key)


@dataclass
class Scenario:
    """A store seeded with a person and a look-alike, and what the kit should expect.

    - `expected_records` / `expected_counts`: the person's records as (collection, key)
      pairs, or counts per collection, when the test knows them independently of the
      connector; without either the kit only requires that locate finds something.
    - `secret_values`: values seeded into secret fields (password hashes, card numbers);
      none may appear anywhere in an export. `secret_fields`: field names never exported.
    - `lookalike_markers`: values only the look-alike's records hold (besides their
      email, always checked); none may appear in the person's export.
    - `retains`: the person has records the store keeps on erasure (legal basis).
    - `correction`: what the correction check applies; by default the first of
      `DEFAULT_CORRECTIONS` the store declares correctable.
    - `log_terms`: identity strings beyond email, name, phone and product ids that must
      never be logged.
    """

    connector: Connector
    person: Identity
    lookalike: Identity
    expected_records: frozenset[Ref] | None = None
    expected_counts: Mapping[str, int] | None = None
    secret_values: tuple[str, ...] = ()
    secret_fields: tuple[str, ...] = ()
    lookalike_markers: tuple[str, ...] = ()
    retains: bool = False
    correction: Correction | None = None
    log_terms: tuple[str, ...] = ()
    cleanup: list[Callable[[], None]] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def refs(result: LocateResult) -> set[Ref]:
    return {(r.collection, r.key) for r in result.records}


def with_discovered(identity: Identity, found: LocateResult) -> Identity:
    """The identity the pipeline passes after locate: what the person gave wins."""
    ids = {**dict(found.discovered_ids), **dict(identity.product_ids)}
    return dataclasses.replace(identity, product_ids=ids)


def export_text(export: StoreExport) -> str:
    """Everything an export would put in the archive, as one searchable string."""
    body = json.dumps(export.records, sort_keys=True, default=str)
    names = " ".join(a.name for a in export.attachments)
    return f"{body} {names}"


def exported_keys(export: StoreExport) -> set[str]:
    keys: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                keys.add(str(k))
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(export.records)
    return keys


def _contains(haystack: str, needle: str) -> bool:
    return needle.strip().lower() in haystack.lower()


def pick_correction(scenario: Scenario) -> Correction:
    if scenario.correction is not None:
        return scenario.correction
    fields = scenario.connector.correctable_fields
    for candidate in DEFAULT_CORRECTIONS:
        if candidate.field in fields:
            return candidate
    raise AssertionError(
        f"store {scenario.connector.name!r} declares correct but none of "
        f"{sorted(c.field for c in DEFAULT_CORRECTIONS)} is correctable; set "
        "Scenario.correction to one of its fields"
    )


def _located_counts(found: LocateResult) -> dict[str, int]:
    return dict(Counter(r.collection for r in found.records))


# --------------------------------------------------------------------------- checks


def check_metadata(s: Scenario) -> None:
    """The registry's own validation passes, and every collection holding the person's
    data has its Art. 15 facts (an access response must carry them for each)."""
    c = s.connector
    problems = validate_connector(c, c.name)
    assert not problems, f"store {c.name!r} fails validation: {'; '.join(problems)}"
    assert c.metadata.name == c.name, f"metadata.name {c.metadata.name!r} is not {c.name!r}"
    assert c.metadata.title.strip(), "metadata.title is empty"
    for key, category in c.metadata.field_categories.items():
        assert str(category).strip(), f"field {key!r} has an empty category"
    collections = {r.collection for r in c.locate(s.person).records}
    if Capability.EXPORT in c.capabilities:
        collections |= set(c.export(s.person).records)
    missing = sorted(collections - set(c.metadata.facts))
    assert not missing, f"no Art. 15 facts for collection(s) {missing}; declare them"
    health = c.health()
    assert health.ok, f"health check fails on a working store: {health.detail}"


def check_locate(s: Scenario) -> None:
    """Locate finds every seeded record of the person and none of the look-alike's."""
    c = s.connector
    found = c.locate(s.person)
    assert found.store == c.name, f"LocateResult.store is {found.store!r}, not {c.name!r}"
    mine = refs(found)
    assert mine, "locate found nothing for the seeded person"
    assert len(mine) == len(found.records), "locate reported a record twice"
    if s.expected_records is not None:
        assert mine == set(s.expected_records), (
            f"locate found {sorted(mine)}, expected {sorted(s.expected_records)}"
        )
    if s.expected_counts is not None:
        assert _located_counts(found) == dict(s.expected_counts), (
            f"locate found {_located_counts(found)} per collection, "
            f"expected {dict(s.expected_counts)}"
        )
    theirs = refs(c.locate(s.lookalike))
    assert theirs, "locate found nothing for the look-alike: seed them so the check means something"
    shared = mine & theirs
    assert not shared, f"the person's locate includes the look-alike's records {sorted(shared)}"
    again = refs(c.locate(with_discovered(s.person, found)))
    assert again == mine, (
        f"locating with the discovered ids {dict(found.discovered_ids)} finds "
        f"{sorted(again ^ mine)} differently"
    )


def check_export(s: Scenario) -> None:
    """Export holds the person's located records, nothing of the look-alike, no secret."""
    c = s.connector
    if Capability.EXPORT not in c.capabilities:
        _expect_unsupported(s, Capability.EXPORT)
        return
    found = c.locate(s.person)
    export = c.export(with_discovered(s.person, found))
    assert export.store == c.name, f"StoreExport.store is {export.store!r}, not {c.name!r}"
    exported = {k: len(v) for k, v in export.records.items() if v}
    assert exported == _located_counts(found), (
        f"export holds {exported} rows per collection but locate found "
        f"{_located_counts(found)}: export must cover exactly the located records"
    )
    text = export_text(export)
    json.dumps(export.records, default=None)  # JSON-serialisable as is, or TypeError
    for marker in (s.lookalike.email, *s.lookalike_markers):
        assert not _contains(text, marker), f"the export holds the look-alike's {marker!r}"
    for secret in s.secret_values:
        assert secret not in text, "the export holds a seeded secret value"
    leaked = sorted(exported_keys(export) & set(s.secret_fields))
    assert not leaked, f"the export holds secret field(s) {leaked}"


def check_correction(s: Scenario) -> None:
    """A correction is applied, shows on re-export, is idempotent, and touches no one else."""
    c = s.connector
    if Capability.CORRECT not in c.capabilities:
        _expect_unsupported(s, Capability.CORRECT)
        return
    wanted = pick_correction(s)
    assert wanted.field in c.correctable_fields, (
        f"{wanted.field!r} is not in correctable_fields {sorted(c.correctable_fields)}"
    )
    found = c.locate(s.person)
    who = with_discovered(s.person, found)
    if Capability.EXPORT in c.capabilities:
        before = export_text(c.export(who))
        assert not _contains(before, wanted.value), "the corrected value is there already"
    result = c.correct(who, (wanted,))
    assert result.applied, f"correcting {wanted.field!r} applied nothing"
    for change in result.applied:
        assert (change.field, change.after) == (wanted.field, wanted.value), (
            f"correction reported {change.field}={change.after!r}"
        )
    if wanted.field == "email":
        who = dataclasses.replace(who, email=wanted.value)
    if Capability.EXPORT in c.capabilities:
        after = export_text(c.export(who))
        assert _contains(after, wanted.value), "the correction does not show on re-export"
        theirs = export_text(c.export(s.lookalike))
        assert not _contains(theirs, wanted.value), "the correction reached the look-alike"
    repeat = c.correct(who, (wanted,))
    assert repeat.applied == (), f"correcting again changed {len(repeat.applied)} value(s)"


def check_erase(s: Scenario) -> None:
    """Erase twice is fine; afterwards only retained records remain, the retained ones
    all stay, and the look-alike's own profile is untouched."""
    c = s.connector
    if Capability.ERASE not in c.capabilities:
        _expect_unsupported(s, Capability.ERASE)
        return
    found = c.locate(s.person)
    who = with_discovered(s.person, found)
    retained_before = {(r.collection, r.key) for r in found.retained}
    if s.retains:
        assert retained_before, "the scenario retains data but locate marks nothing retained"
    twin_before = c.locate(s.lookalike)
    first = c.erase(who)
    assert first.store == c.name, f"ErasureResult.store is {first.store!r}, not {c.name!r}"
    if found.erasable:
        assert first.deleted + first.anonymized > 0, "erase reported nothing deleted or anonymized"
    kept = sum(r.count for r in first.retained)
    assert kept == len(retained_before), (
        f"erase reports {kept} retained record(s); locate marked {len(retained_before)}"
    )
    for r in first.retained:
        assert r.legal_basis.strip() and r.period.strip(), (
            f"records of {r.collection!r} are retained without a legal basis and period"
        )
    second = c.erase(who)
    assert (second.deleted, second.anonymized) == (0, 0), (
        f"a second erase still deleted {second.deleted} / anonymized {second.anonymized}"
    )
    after = c.locate(who)
    left = sorted((r.collection, r.key) for r in after.erasable)
    assert not left, f"erase left erasable record(s) {left}"
    retained_after = {(r.collection, r.key) for r in after.retained}
    assert retained_after == retained_before, (
        f"retained records changed: lost {sorted(retained_before - retained_after)}"
    )
    # Others' rows hanging on the person's may go with them (a comment on their video);
    # the look-alike's own identity records never do.
    twin_after = refs(c.locate(s.lookalike))
    own = {(r.collection, r.key) for r in twin_before.records if r.via == "identity"}
    assert own <= twin_after, f"erase removed the look-alike's records {sorted(own - twin_after)}"


def check_opt_out(s: Scenario) -> None:
    """Opt-out is idempotent and removes nothing."""
    c = s.connector
    if Capability.OPT_OUT not in c.capabilities:
        _expect_unsupported(s, Capability.OPT_OUT)
        return
    found = c.locate(s.person)
    who = with_discovered(s.person, found)
    first = c.opt_out(who)
    assert first.store == c.name, f"OptOutResult.store is {first.store!r}, not {c.name!r}"
    again = c.opt_out(who)
    assert again.updated == 0, f"a second opt-out still updated {again.updated} record(s)"
    assert refs(c.locate(who)) == refs(found), "opt-out changed which records the person has"


def _export_facts(export: StoreExport) -> tuple[Any, ...]:
    """What an export holds, comparable across calls (attachments by name and size)."""
    return (export.store, export.records, [(a.name, a.size) for a in export.attachments])


def check_batch_reads(s: Scenario) -> None:
    """A connector that reads for many people at once (`BatchReads`) answers for each
    exactly as it does alone, in order: with the look-alike, an unknown person, the
    person with and without discovered ids, and the same person twice in one batch."""
    c = s.connector
    if not isinstance(c, BatchReads):
        return
    found = c.locate(s.person)
    batch = [
        s.person,
        s.lookalike,
        Identity("nobody.kit@example.invalid"),
        with_discovered(s.person, found),
        s.person,
    ]
    assert c.locate_many([]) == [], "locate_many([]) is not an empty list"
    many = c.locate_many(batch)
    assert len(many) == len(batch), f"locate_many gave {len(many)} results for {len(batch)} people"
    for n, (who, got) in enumerate(zip(batch, many, strict=True)):
        alone = c.locate(who)
        assert got == alone, (
            f"locate_many's result {n} differs from locate() for that person alone: "
            f"{sorted(refs(got) ^ refs(alone))[:10]} (records), discovered ids "
            f"{'differ' if got.discovered_ids != alone.discovered_ids else 'agree'}"
        )
    if Capability.EXPORT not in c.capabilities:
        return
    assert c.export_many([]) == [], "export_many([]) is not an empty list"
    exports = c.export_many(batch)
    assert len(exports) == len(batch), (
        f"export_many gave {len(exports)} results for {len(batch)} people"
    )
    for n, (who, export) in enumerate(zip(batch, exports, strict=True)):
        own = c.export(who)
        differing = sorted(
            k
            for k in {*export.records, *own.records}
            if export.records.get(k) != own.records.get(k)
        )
        assert _export_facts(export) == _export_facts(own), (
            f"export_many's result {n} differs from export() for that person alone "
            f"(collections {differing})"
        )


def _call(c: Connector, capability: Capability, who: Identity, s: Scenario) -> Any:
    if capability is Capability.EXPORT:
        return c.export(who)
    if capability is Capability.CORRECT:
        return c.correct(who, (s.correction or DEFAULT_CORRECTIONS[0],))
    if capability is Capability.ERASE:
        return c.erase(who)
    if capability is Capability.OPT_OUT:
        return c.opt_out(who)
    return c.locate(who)


def _expect_unsupported(s: Scenario, capability: Capability) -> None:
    c = s.connector
    before = c.locate(s.person)
    who = with_discovered(s.person, before)
    try:
        outcome = _call(c, capability, who, s)
    except UnsupportedAction as exc:
        assert c.name in str(exc), f"UnsupportedAction does not name the store: {exc}"
    else:
        raise AssertionError(
            f"store {c.name!r} does not declare {capability.value!r}, yet {capability.value}() "
            f"returned {outcome!r} instead of raising UnsupportedAction"
        )
    assert refs(c.locate(s.person)) == refs(before), (
        f"the refused {capability.value}() changed the store"
    )


def check_unsupported_actions(s: Scenario) -> None:
    """Every capability not declared raises UnsupportedAction naming the store, changing nothing."""
    for capability in Capability:
        if capability not in s.connector.capabilities:
            _expect_unsupported(s, capability)


def _identity_terms(s: Scenario, found: LocateResult) -> list[str]:
    values: list[str | None] = [
        s.person.email,
        s.person.name,
        s.person.phone,
        s.lookalike.email,
        *s.person.product_ids.values(),
        *found.discovered_ids.values(),
        *s.log_terms,
    ]
    return sorted({v.strip() for v in values if v and len(v.strip()) >= MIN_TERM_LENGTH})


def exercise(s: Scenario) -> LocateResult:
    """Every declared action once, as a request of each type would call them."""
    c = s.connector
    found = c.locate(s.person)
    who = with_discovered(s.person, found)
    c.locate(s.lookalike)
    c.health()
    caps = c.capabilities
    if Capability.EXPORT in caps:
        c.export(who)
    if Capability.CORRECT in caps:
        c.correct(who, (pick_correction(s),))
    if Capability.OPT_OUT in caps:
        c.opt_out(who)
    if Capability.ERASE in caps:
        c.erase(who)
        c.locate(who)
    for capability in Capability:
        if capability not in caps:
            with contextlib.suppress(UnsupportedAction):
                _call(c, capability, who, s)
    return found


def check_no_identity_in_logs(s: Scenario, caplog: pytest.LogCaptureFixture) -> None:
    """No email, name, phone or product id of the person appears in any log event,
    whether written through structlog or the standard library's logging."""
    with caplog.at_level(logging.DEBUG), structlog.testing.capture_logs() as events:
        found = exercise(s)
    lines = [json.dumps(e, sort_keys=True, default=str) for e in events]
    for record in caplog.records:
        lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")
    for term in _identity_terms(s, found):
        hits = [line for line in lines if _contains(line, term)]
        assert not hits, f"an identity ({len(term)} characters) is in the logs: {hits[0][:200]}"


ALL_CHECKS: tuple[Callable[[Scenario], None], ...] = (
    check_metadata,
    check_locate,
    check_export,
    check_correction,
    check_erase,
    check_opt_out,
    check_unsupported_actions,
    check_batch_reads,
)


# --------------------------------------------------------------------------- base class


class ConnectorContract:
    """Subclass as `class TestMyStore(ConnectorContract)` and implement `make_scenario`
    (or override the `scenario` fixture); every test below then runs on your store."""

    def make_scenario(self, tmp_path: Path) -> Scenario:
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_scenario(tmp_path) -> Scenario "
            "or override the `scenario` fixture"
        )

    @pytest.fixture
    def scenario(self, tmp_path: Path) -> Iterator[Scenario]:
        built = self.make_scenario(tmp_path)
        yield built
        close_scenario(built)

    def test_metadata_declares_every_fact_and_passes_validation(self, scenario: Scenario) -> None:
        check_metadata(scenario)

    def test_locate_finds_every_record_of_the_person_and_none_of_the_look_alike(
        self, scenario: Scenario
    ) -> None:
        check_locate(scenario)

    def test_export_is_scoped_to_the_person_and_holds_no_secret(self, scenario: Scenario) -> None:
        check_export(scenario)

    def test_a_correction_shows_on_re_export(self, scenario: Scenario) -> None:
        check_correction(scenario)

    def test_erase_twice_leaves_nothing_erasable_and_keeps_retained_data(
        self, scenario: Scenario
    ) -> None:
        check_erase(scenario)

    def test_opt_out_is_idempotent(self, scenario: Scenario) -> None:
        check_opt_out(scenario)

    def test_undeclared_actions_raise_unsupported_action(self, scenario: Scenario) -> None:
        check_unsupported_actions(scenario)

    def test_a_batch_read_answers_for_each_person_as_alone(self, scenario: Scenario) -> None:
        check_batch_reads(scenario)

    def test_no_identity_appears_in_the_logs(
        self, scenario: Scenario, caplog: pytest.LogCaptureFixture
    ) -> None:
        check_no_identity_in_logs(scenario, caplog)


def close_scenario(s: Scenario) -> None:
    s.connector.close()
    for step in reversed(s.cleanup):
        step()


__all__ = [
    "ALL_CHECKS",
    "ConnectorContract",
    "DEFAULT_CORRECTIONS",
    "Scenario",
    "check_batch_reads",
    "check_correction",
    "check_erase",
    "check_export",
    "check_locate",
    "check_metadata",
    "check_no_identity_in_logs",
    "check_opt_out",
    "check_unsupported_actions",
    "close_scenario",
    "with_discovered",
]
