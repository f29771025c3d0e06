"""`privacy connector dry-run` and `privacy connector scaffold`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from connectors.allego.seed import SQL_STORES, DemoManifest, seed_demo_stores, sqlite_path
from connectors.base import Capability, Identity
from connectors.dryrun import CannotPlan, dry_run
from connectors.registry import _import, close_all, load_connectors, validate_connector
from connectors.testing import with_discovered
from pipeline.cli import main
from tests.unit.connectors.kit_seeds import seeded_memory

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def demo(tmp_path: Path) -> DemoManifest:
    return seed_demo_stores(tmp_path, people=60, seed=7)


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall() for t in tables}


def nulls(db: Path, label: str) -> int:
    table, column = label.split(".")
    with sqlite3.connect(db) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{table}" WHERE "{column}" IS NULL').fetchone()
    return int(row[0])


def run(*args: str, data_dir: Path) -> Any:
    runner = CliRunner()
    return runner.invoke(
        main, ["connector", *args], env={"PRIVACY_DATA_DIR": str(data_dir)}, catch_exceptions=False
    )


@pytest.mark.parametrize("store", SQL_STORES)
def test_a_dry_run_changes_nothing_and_its_plan_is_what_erase_then_does(
    demo: DemoManifest, store: str
) -> None:
    dana = demo.person("dana")
    db = sqlite_path(Path(demo.data_dir), store)
    before = dump(db)
    result = run("dry-run", store, "--email", dana.email, "--json", data_dir=Path(demo.data_dir))
    assert result.exit_code == 0, result.output
    assert dump(db) == before, "the dry run changed the store"
    plan = json.loads(result.stdout)
    assert plan["located"] == dana.records[store]

    stores = load_connectors(None, Path(demo.data_dir))
    try:
        connector = stores[store]
        who = with_discovered(dana.identity(), connector.locate(dana.identity()))
        unlinked_before = {label: nulls(db, label) for label in plan["erase"]["unlink"]}
        erased = connector.erase(who)
    finally:
        close_all(stores)
    after = dump(db)
    erase = plan["erase"]
    for table in before:
        gone = len(before[table]) - len(after[table])
        assert gone == erase["delete"].get(table, 0) + erase["dependents"].get(table, 0), table
    assert erased.deleted == sum(erase["delete"].values())
    assert erased.anonymized == sum(erase["anonymize"].values())
    assert {r.collection: r.count for r in erased.retained} == {
        k: v["count"] for k, v in erase["retain"].items()
    }
    for label, count in erase["unlink"].items():
        assert nulls(db, label) - unlinked_before[label] == count


def test_the_dry_run_names_fields_and_counts_never_values(demo: DemoManifest) -> None:
    dana = demo.person("dana")
    result = run("dry-run", "video", "--email", dana.email, data_dir=Path(demo.data_dir))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "users: 1 row(s); created_at, email, id" in out
    assert "password_hash" not in out
    assert "delete others' rows hanging on them: comments" in out
    assert out.rstrip().endswith("nothing was changed")
    assert dana.email not in out and dana.name not in out
    assert dana.product_ids["video"] not in out


def test_the_dry_run_of_the_billing_store_shows_what_the_law_keeps(demo: DemoManifest) -> None:
    dana = demo.person("dana")
    result = run("dry-run", "billing", "--email", dana.email, data_dir=Path(demo.data_dir))
    assert "anonymize: accounts 1" in result.output
    assert "retain: invoices 3 (Tax law" in result.output


def test_the_dry_run_of_the_media_store_leaves_every_file(demo: DemoManifest) -> None:
    dana = demo.person("dana")
    root = Path(demo.stores["media"])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    result = run("dry-run", "media", "--email", dana.email, "--json", data_dir=Path(demo.data_dir))
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == files
    assert json.loads(result.stdout)["erase"]["delete"] == dana.records["media"]


def test_a_connector_that_cannot_plan_is_refused_before_anything_runs() -> None:
    inner = seeded_memory()

    class Opaque:
        """A custom connector that erases but cannot say what it would erase."""

        name, capabilities = "crm", frozenset(Capability)
        metadata, correctable_fields = inner.metadata, inner.correctable_fields

        def __getattr__(self, attr: str) -> Any:
            return getattr(inner, attr)

    with pytest.raises(CannotPlan, match="cannot plan an erasure without acting"):
        dry_run(Opaque(), Identity("robin.kit@example.com"))  # type: ignore[arg-type]
    assert inner.calls == []


def test_an_unknown_store_is_named_with_the_configured_ones(demo: DemoManifest) -> None:
    result = CliRunner().invoke(
        main,
        ["connector", "dry-run", "crm", "--email", "a@example.com"],
        env={"PRIVACY_DATA_DIR": demo.data_dir},
    )
    assert result.exit_code == 1
    assert "no store 'crm' is configured; configured: billing, coaching" in result.output


def test_a_scaffolded_package_passes_the_kit_as_generated(tmp_path: Path) -> None:
    target = tmp_path / "pkg"
    result = run("scaffold", "field_notes", str(target), data_dir=tmp_path)
    assert result.exit_code == 0, result.output
    package = target / "allego_field_notes_connector"
    assert (package / "connector.py").is_file() and (package / "mapping.toml").is_file()
    assert (target / "tests" / "fixtures" / "example.json").is_file()

    pyproject = tomllib.loads((target / "pyproject.toml").read_text(encoding="utf-8"))
    entry = pyproject["project"]["entry-points"]["allego_privacy.connectors"]
    assert entry == {"field_notes": "allego_field_notes_connector.connector:FieldNotesConnector"}

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target / "tests")],
        cwd=target,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "9 passed" in tests.stdout  # every kit test, batch reads included

    sys.path.insert(0, str(target))
    try:
        cls = _import(entry["field_notes"])
        store = cls.from_config("field_notes", {"path": str(tmp_path / "x.json")}, tmp_path)
        assert validate_connector(store, "field_notes") == []
    finally:
        sys.path.remove(str(target))


def test_scaffold_refuses_a_bad_name_or_a_directory_in_use(tmp_path: Path) -> None:
    assert (
        "not a valid store name"
        in run("scaffold", "Bad-Name", str(tmp_path / "a"), data_dir=tmp_path).output
    )
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert (
        "is not empty" in run("scaffold", "notes", str(tmp_path / "used"), data_dir=tmp_path).output
    )
