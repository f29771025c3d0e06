"""The in-memory reference connector: the contract in its plainest form, and the test fake."""

from __future__ import annotations

import pytest

from connectors.base import (
    Capability,
    Connector,
    Correction,
    Identity,
    InvalidCorrection,
    StoreUnavailable,
    UnsupportedAction,
)
from connectors.memory import MemoryConnector
from connectors.registry import validate_connector

ADA = Identity(email=" Ada@Example.com ")


def crm() -> MemoryConnector:
    return MemoryConnector(
        "crm",
        people=[
            {
                "id": "p1",
                "email": "ada@example.com",
                "name": "Ada",
                "password_hash": "x",
                "contact_ok": True,
            },
            {"id": "p2", "email": "ada@example.org", "name": "Ada", "contact_ok": True},
        ],
        records={
            "notes": [
                {"id": "n1", "owner": "p1", "text": "called"},
                {"id": "n2", "owner": "p2", "text": "other Ada"},
            ],
            "invoices": [{"id": "i1", "owner": "p1", "amount": "10.00"}],
        },
        retain={"invoices": ("Tax law", "10 years")},
    )


def test_memory_connector_satisfies_the_protocol_and_the_registry_checks() -> None:
    store = crm()
    assert isinstance(store, Connector)
    assert validate_connector(store, "crm") == []
    assert store.capabilities == frozenset(Capability)


def test_locate_matches_email_only_of_the_right_person() -> None:
    found = crm().locate(ADA)
    assert {(r.collection, r.key) for r in found.records} == {
        ("people", "p1"),
        ("notes", "n1"),
        ("invoices", "i1"),
    }
    assert found.discovered_ids == {"crm": "p1"}
    assert [r.key for r in found.retained] == ["i1"]


def test_export_leaves_out_secret_fields() -> None:
    export = crm().export(ADA)
    assert "password_hash" not in export.records["people"][0]
    assert export.records["notes"] == [{"id": "n1", "owner": "p1", "text": "called"}]


def test_correct_validates_and_is_idempotent() -> None:
    store = crm()
    result = store.correct(ADA, (Correction("name", "Ada L."), Correction("blood_type", "0")))
    assert [(c.before, c.after) for c in result.applied] == [("Ada", "Ada L.")]
    assert result.not_held == ("blood_type",)
    assert store.correct(ADA, (Correction("name", "Ada L."),)).applied == ()
    with pytest.raises(InvalidCorrection, match="email"):
        store.correct(ADA, (Correction("email", "nope"),))


def test_erase_twice_keeps_only_retained_records() -> None:
    store = crm()
    first = store.erase(Identity(email="ada@example.com", product_ids={"crm": "p1"}))
    assert (first.deleted, [r.count for r in first.retained]) == (2, [1])
    again = store.erase(Identity(email="ada@example.com", product_ids={"crm": "p1"}))
    assert again.deleted == 0
    after = store.locate(Identity(email="ada@example.com", product_ids={"crm": "p1"}))
    assert after.erasable == () and [r.key for r in after.retained] == ["i1"]
    assert store.locate(Identity(email="ada@example.org")).records  # the other Ada is untouched


def test_opt_out_counts_only_real_changes() -> None:
    store = crm()
    assert store.opt_out(ADA).updated == 1
    assert store.opt_out(ADA).updated == 0
    assert store.people[0]["contact_ok"] is False and store.people[1]["contact_ok"] is True


def test_fail_next_and_down_make_the_store_unavailable() -> None:
    store = crm()
    store.fail_next(2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            store.locate(ADA)
    assert store.locate(ADA).records
    store.down = True
    with pytest.raises(StoreUnavailable):
        store.erase(ADA)
    assert store.health().ok is False
    assert store.calls[:3] == ["locate", "locate", "locate"]


def test_an_undeclared_capability_raises_unsupported_action() -> None:
    store = MemoryConnector(
        "ro",
        people=[{"id": "1", "email": "a@example.com"}],
        capabilities={Capability.LOCATE, Capability.EXPORT},
    )
    with pytest.raises(UnsupportedAction):
        store.erase(Identity("a@example.com"))
