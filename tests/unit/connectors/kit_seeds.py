"""Seeds for running the conformance kit: a person, a look-alike and retained data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from connectors.base import Capability, Identity
from connectors.memory import MemoryConnector
from connectors.testing import Scenario

PERSON = Identity(email="robin.kit@example.com", name="Robin Kitson", phone="+1 555 0142")
LOOKALIKE = Identity(email="robin.kit@example.org", name="Robin Kitson")
SECRET = "argon2id$kit-secret-hash-0001"


def seeded_memory(
    cls: type[MemoryConnector] = MemoryConnector,
    *,
    capabilities: Iterable[Capability] | None = None,
    **kwargs: Any,
) -> MemoryConnector:
    return cls(
        "crm",
        people=[
            {
                "id": "crm-person-0001",
                "email": PERSON.email,
                "name": PERSON.name,
                "phone": PERSON.phone,
                "job_title": "Account Executive",
                "password_hash": SECRET,
                "contact_ok": True,
            },
            {
                "id": "crm-twin-0002",
                "email": LOOKALIKE.email,
                "name": LOOKALIKE.name,
                "job_title": "Buyer",
                "password_hash": "argon2id$twin-secret-hash-0002",
                "contact_ok": True,
            },
            {"id": "crm-other-0003", "email": "someone.else@example.net", "name": "Ola Berg"},
        ],
        records={
            "notes": [
                {"id": "n-1", "owner": "crm-person-0001", "text": "asked for a demo"},
                {"id": "n-2", "owner": "crm-person-0001", "text": "renewal call"},
                {"id": "n-3", "owner": "crm-twin-0002", "text": "twin-only note"},
                {"id": "n-4", "owner": "crm-other-0003", "text": "unrelated"},
            ],
            "invoices": [
                {"id": "inv-1", "owner": "crm-person-0001", "amount": "10.00"},
                {"id": "inv-2", "owner": "crm-twin-0002", "amount": "12.00"},
            ],
        },
        retain={"invoices": ("Tax law: invoices kept 10 years", "10 years")},
        capabilities=capabilities,
        **kwargs,
    )


def memory_scenario(connector: MemoryConnector) -> Scenario:
    return Scenario(
        connector=connector,
        person=PERSON,
        lookalike=LOOKALIKE,
        expected_records=frozenset(
            {
                ("people", "crm-person-0001"),
                ("notes", "n-1"),
                ("notes", "n-2"),
                ("invoices", "inv-1"),
            }
        ),
        secret_values=(SECRET,),
        secret_fields=("password_hash",),
        lookalike_markers=("twin-only note", "crm-twin-0002"),
        retains=True,
    )
