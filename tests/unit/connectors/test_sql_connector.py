"""The declarative SQL connector against the seeded Allego demo stores (SQLite)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from connectors.allego.seed import SQL_STORES, DemoManifest, sqlite_path
from connectors.base import (
    Capability,
    Connector,
    Correction,
    Identity,
    InvalidCorrection,
    MappingError,
    StoreUnavailable,
)
from connectors.registry import load_connectors
from connectors.sql import REDACTED, SqlConnector, SqlMapping

ALLEGO = Path(__file__).resolve().parents[3] / "connectors" / "allego"
SECRETS = {"password_hash", "security_answer", "card_number"}


def counts(result: Any) -> dict[str, int]:
    return dict(Counter(r.collection for r in result.records))


def rows(demo: DemoManifest, store: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(sqlite_path(Path(demo.data_dir), store)) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.mark.parametrize("store", SQL_STORES)
def test_locate_finds_every_seeded_record_of_the_demo_person(
    demo: DemoManifest, stores: dict[str, Connector], store: str
) -> None:
    dana = demo.person("dana")
    result = stores[store].locate(dana.identity())
    assert counts(result) == dana.records[store]
    assert result.store == store


@pytest.mark.parametrize("store", SQL_STORES)
def test_locate_never_includes_the_look_alike(
    demo: DemoManifest, stores: dict[str, Connector], store: str
) -> None:
    dana, twin = demo.person("dana"), demo.person("dana_lookalike")
    mine = {
        (r.collection, r.key) for r in stores[store].locate(dana.identity(with_ids=True)).records
    }
    theirs = {
        (r.collection, r.key) for r in stores[store].locate(twin.identity(with_ids=True)).records
    }
    assert counts(stores[store].locate(twin.identity())) == twin.records.get(store, {})
    assert not mine & theirs


def test_locate_matches_email_case_insensitively_and_trimmed(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    sam = demo.person("sam")
    shouted = Identity(email="  SAM.OKAFOR@example.COM ")
    assert counts(stores["learning"].locate(shouted)) == sam.records["learning"]


def test_locate_reports_the_store_user_id_it_discovered(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    for store in ("video", "coaching", "learning", "billing"):
        found = stores[store].locate(dana.identity())
        assert found.discovered_ids == {store: dana.product_ids[store]}


def test_locate_by_product_id_alone_finds_the_same_records(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    by_id = Identity(email="", product_ids={"video": dana.product_ids["video"]})
    assert counts(stores["video"].locate(by_id)) == dana.records["video"]


def test_locate_finds_nothing_for_an_unknown_email(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    nobody = demo.person("nobody").identity()
    for store in SQL_STORES:
        result = stores[store].locate(nobody)
        assert result.records == ()
        assert result.discovered_ids == {}


def test_locate_reaches_records_only_linked_through_other_records(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    found = stores["learning"].locate(demo.person("dana").identity())
    quiz = [r for r in found.records if r.collection == "quiz_results"]
    assert quiz and all(r.via == "quiz_results.enrollment_id" for r in quiz)


def test_locate_flags_billing_invoices_as_retained(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    found = stores["billing"].locate(demo.person("dana").identity())
    assert {r.collection for r in found.retained} == {"invoices"}
    assert {r.collection for r in found.erasable} == {"accounts"}


def test_export_omits_secret_columns(demo: DemoManifest, stores: dict[str, Connector]) -> None:
    dana = demo.person("dana").identity()
    for store in SQL_STORES:
        export = stores[store].export(dana)
        for table, items in export.records.items():
            for item in items:
                assert not SECRETS & set(item), f"{store}.{table} leaks a secret"
    invoices = stores["billing"].export(dana).records["invoices"]
    assert all(len(i["card_last4"]) == 4 for i in invoices)


def test_export_redacts_other_people_and_leaves_out_their_comments(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    feedback = stores["coaching"].export(dana.identity()).records["feedback"]
    assert feedback and all(f["reviewer_id"] == REDACTED for f in feedback)
    comments = stores["video"].export(dana.identity()).records["comments"]
    assert {c["author_id"] for c in comments} == {dana.product_ids["video"]}
    others_on_her_videos = rows(
        demo,
        "video",
        "SELECT count(*) FROM comments c JOIN videos v ON v.id = c.video_id "
        "WHERE v.owner_id = ? AND c.author_id != ?",
        dana.product_ids["video"],
        dana.product_ids["video"],
    )[0][0]
    assert others_on_her_videos >= 2  # they exist, and are not in her export


def test_export_is_json_serialisable_with_dates_and_decimals_as_strings(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana").identity()
    export = stores["billing"].export(dana)
    json.dumps(export.records)
    invoice = export.records["invoices"][0]
    assert isinstance(invoice["amount"], str) and "." in invoice["amount"]
    assert isinstance(invoice["issued_at"], str)
    json.dumps(stores["learning"].export(dana).records)


def test_correct_then_export_shows_the_new_value(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana").identity()
    video = stores["video"]
    result = video.correct(
        dana, (Correction("job_title", "Head of Sales"), Correction("shoe_size", "9"))
    )
    assert [(c.field, c.after) for c in result.applied] == [("job_title", "Head of Sales")]
    assert result.applied[0].before != "Head of Sales"
    assert result.not_held == ("shoe_size",)
    assert video.export(dana).records["users"][0]["job_title"] == "Head of Sales"
    assert video.correct(dana, (Correction("job_title", "Head of Sales"),)).applied == ()


def test_correct_rejects_an_invalid_phone_and_changes_nothing(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana").identity()
    before = stores["video"].export(dana).records["users"][0]
    with pytest.raises(InvalidCorrection, match="phone"):
        stores["video"].correct(
            dana, (Correction("name", "Dana R."), Correction("phone", "call me"))
        )
    with pytest.raises(InvalidCorrection, match="email"):
        stores["video"].correct(dana, (Correction("email", "not-an-address"),))
    assert stores["video"].export(dana).records["users"][0] == before


def test_correcting_a_field_in_two_lead_rows_changes_both(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana").identity()
    result = stores["marketing"].correct(dana, (Correction("phone", "+49 30 1234567"),))
    assert len(result.applied) == 2
    assert {lead["phone"] for lead in stores["marketing"].export(dana).records["leads"]} == {
        "+49 30 1234567"
    }


def test_erase_twice_is_fine_and_leaves_only_retained_invoices(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    identity = dana.identity(with_ids=True)
    first = {s: stores[s].erase(identity) for s in SQL_STORES}
    for store in ("video", "coaching", "learning", "marketing"):
        assert first[store].deleted == sum(dana.records[store].values())
        assert first[store].retained == ()
    assert first["billing"].anonymized == 1
    (retention,) = first["billing"].retained
    assert (retention.collection, retention.count) == ("invoices", 3)
    assert "Tax law" in retention.legal_basis and retention.period == "10 years from issue"

    second = {s: stores[s].erase(identity) for s in SQL_STORES}
    assert all(r.deleted == 0 and r.anonymized == 0 for r in second.values())

    for store in SQL_STORES:
        after = stores[store].locate(identity)
        assert after.erasable == ()
        assert stores[store].locate(dana.identity()).records == ()
    assert {r.collection for r in stores["billing"].locate(identity).retained} == {"invoices"}
    assert (
        rows(
            demo,
            "billing",
            "SELECT count(*) FROM invoices WHERE account_id = ?",
            dana.product_ids["billing"],
        )[0][0]
        == 3
    )
    assert rows(
        demo, "billing", "SELECT email FROM accounts WHERE id = ?", dana.product_ids["billing"]
    )[0][0].endswith("@invalid.example")


def test_erase_removes_others_rows_hanging_on_the_person_and_spares_the_rest(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana, twin = demo.person("dana"), demo.person("dana_lookalike")
    dana_id = dana.product_ids["coaching"]
    reviewed = rows(demo, "coaching", "SELECT id FROM feedback WHERE reviewer_id = ?", dana_id)
    twin_before = counts(stores["video"].locate(twin.identity()))

    stores["video"].erase(dana.identity())
    stores["coaching"].erase(dana.identity())

    assert (
        rows(
            demo,
            "video",
            "SELECT count(*) FROM comments WHERE video_id NOT IN (SELECT id FROM videos)",
        )[0][0]
        == 0
    )
    # the look-alike's comment on and view of Dana's videos went with them; nothing else of theirs
    assert twin_before == {"users": 1, "videos": 2, "comments": 1, "views": 1}
    assert counts(stores["video"].locate(twin.identity())) == {"users": 1, "videos": 2}
    # feedback Dana wrote on someone else's recording stays, without her as reviewer
    kept = rows(demo, "coaching", "SELECT reviewer_id FROM feedback WHERE id = ?", reviewed[0][0])
    assert kept == [(None,)]


def test_opt_out_turns_contact_preferences_off_once(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    dana = demo.person("dana")
    assert stores["marketing"].opt_out(dana.identity()).updated == 4
    assert stores["marketing"].opt_out(dana.identity()).updated == 0
    assert rows(
        demo,
        "marketing",
        "SELECT DISTINCT s.opted_in FROM subscriptions s JOIN leads l "
        "ON l.id = s.lead_id WHERE lower(trim(l.email)) = ?",
        dana.email,
    ) == [(0,)]
    assert stores["video"].opt_out(dana.identity()).updated == 1
    assert rows(
        demo, "video", "SELECT marketing_emails FROM users WHERE id = ?", dana.product_ids["video"]
    ) == [(0,)]


def test_capabilities_follow_the_mapping(stores: dict[str, Connector]) -> None:
    assert Capability.OPT_OUT not in stores["billing"].capabilities
    assert Capability.OPT_OUT in stores["video"].capabilities
    assert stores["video"].correctable_fields == {"name", "email", "phone", "job_title"}
    assert (
        stores["billing"].metadata.field_categories["invoices.card_number"] == "payment card number"
    )


def _mapping_with(extra: str) -> str:
    return (ALLEGO / "video.toml").read_text(encoding="utf-8") + extra


def _load(tmp_path: Path, mapping: str) -> dict[str, Connector]:
    (tmp_path / "m.toml").write_text(mapping, encoding="utf-8")
    (tmp_path / "stores.toml").write_text(
        '[stores.clips]\nconnector = "sql"\nurl = "sqlite:///{data_dir}/clips.db"\n'
        'mapping = "m.toml"\n',
        encoding="utf-8",
    )
    return load_connectors(tmp_path / "stores.toml", tmp_path)


def test_a_mapping_with_a_reference_cycle_fails_at_load_naming_the_store(tmp_path: Path) -> None:
    cyclic = _mapping_with(
        '\n[tables.users.references]\nfavourite_video = { to = "videos.id", owner = false }\n'
    )
    with pytest.raises(MappingError, match=r"store 'clips'.*'sql'.*cycle \(.*users.*videos"):
        _load(tmp_path, cyclic)


def test_a_mapping_with_a_missing_reference_target_fails_at_load(tmp_path: Path) -> None:
    broken = _mapping_with(
        '\n[tables.likes]\nprimary_key = "id"\nerase = { strategy = "delete" }\n'
        'references.video_id = { to = "clips.id", owner = true }\n'
        '[tables.likes.facts]\npurpose = "p"\ncategories = ["c"]\n'
        'recipients = ["r"]\nretention = "r"\nsource = "s"\n'
    )
    with pytest.raises(MappingError, match=r"store 'clips'.*table 'clips'.*does not declare"):
        _load(tmp_path, broken)


def test_an_anonymized_table_that_would_still_match_fails_at_load() -> None:
    text = (
        (ALLEGO / "billing.toml")
        .read_text(encoding="utf-8")
        .replace('email = "email", name = "redact"', 'name = "redact"')
    )
    import tomllib

    with pytest.raises(MappingError, match="would still match"):
        SqlMapping.from_dict(tomllib.loads(text), store="billing")


def test_an_unreachable_store_file_raises_store_unavailable(tmp_path: Path) -> None:
    mapping = SqlMapping.load(ALLEGO / "video.toml", store="video")
    missing = SqlConnector("video", mapping, f"sqlite:///{tmp_path}/gone/video.db")
    for call in (
        lambda: missing.locate(Identity("a@example.com")),
        lambda: missing.export(Identity("a@example.com")),
        lambda: missing.erase(Identity("a@example.com")),
        lambda: missing.opt_out(Identity("a@example.com")),
    ):
        with pytest.raises(StoreUnavailable):
            call()
    assert missing.health().ok is False
    assert not (tmp_path / "gone").exists()  # nothing was created on the way


def test_a_broken_database_raises_store_unavailable_from_the_driver_error(tmp_path: Path) -> None:
    (tmp_path / "video.db").write_bytes(b"this is not a database" * 100)
    mapping = SqlMapping.load(ALLEGO / "video.toml", store="video")
    broken = SqlConnector("video", mapping, f"sqlite:///{tmp_path}/video.db")
    with pytest.raises(StoreUnavailable) as caught:
        broken.locate(Identity("a@example.com"))
    assert caught.value.__cause__ is not None


def test_health_checks_the_declared_tables(
    demo: DemoManifest, stores: dict[str, Connector]
) -> None:
    assert stores["video"].health().ok
    with sqlite3.connect(sqlite_path(Path(demo.data_dir), "video")) as conn:
        conn.execute("DROP TABLE views")
    health = stores["video"].health()
    assert not health.ok and "views" in health.detail
