"""A store the pipeline has never seen joins through an entry point and a stores TOML
alone (no pipeline file touched) and takes part in all five request types, end to end
in process: real state database (SQLite and PostgreSQL), real SMTP sink, inline bus."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.base import MappingError
from connectors.registry import available_plugins, close_all, load_connectors
from pipeline import verification
from pipeline.archive import open_archive
from pipeline.bootstrap import App
from pipeline.db import ExportRow
from pipeline.intake import accept
from pipeline.mailsink import MailSink
from pipeline.status import describe_request
from pipeline.suppression import is_contactable
from tests.conftest import InlineBus, make_app
from tests.integration.connectors.notebook_store import NotebookConnector
from tests.integration.support import EMAIL, NAME, document

TWIN = "dana.reyes@example.org"
ENTRY_POINT = "tests.integration.connectors.notebook_store:NotebookConnector"

STORES_TOML = """
[stores.notebook]
connector = "notebook"
path = "{data_dir}/notebook.json"
title = "Allego Notebook"
description = "Private notes people keep while they coach."
retain = { receipts = { legal_basis = "Tax law: receipts kept 10 years", period = "10 years" } }

[stores.notebook.facts.people]
purpose = "Your Notebook account"
categories = ["identifiers", "contact details", "professional details"]
recipients = ["hosting provider (processor)"]
retention = "While the account is active"
source = "Provided by you"

[stores.notebook.facts.notes]
purpose = "Keep the notes you write"
categories = ["user content"]
recipients = ["nobody but you"]
retention = "While the account is active"
source = "Written by you"

[stores.notebook.facts.receipts]
purpose = "Bill Notebook subscriptions"
categories = ["financial data"]
recipients = ["tax authorities"]
retention = "10 years (tax law)"
source = "Created when you pay"
"""

NOTEBOOK = {
    "people": [
        {
            "id": "nb-dana-01",
            "email": EMAIL,
            "name": NAME,
            "job_title": "AE",
            "password_hash": "scrypt$notebook-secret-0001",
            "contact_ok": True,
        },
        {"id": "nb-twin-02", "email": TWIN, "name": NAME, "contact_ok": True},
    ],
    "records": {
        "notes": [
            {"id": "note-1", "owner": "nb-dana-01", "text": "prep for the QBR"},
            {"id": "note-2", "owner": "nb-dana-01", "text": "call back Tuesday"},
            {"id": "note-3", "owner": "nb-twin-02", "text": "twin's own note"},
        ],
        "receipts": [{"id": "rc-1", "owner": "nb-dana-01", "amount": "9.00"}],
    },
}


def register_plugin(site: Path) -> None:
    """What `pip install allego-notebook-connector` would leave on sys.path."""
    dist = site / "allego_notebook_connector-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: allego-notebook-connector\nVersion: 1.0\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(
        f"[allego_privacy.connectors]\nnotebook = {ENTRY_POINT}\n", encoding="utf-8"
    )


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[MailSink]:
    with MailSink(tmp_path / "mail", port=0) as s:
        yield s


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "notebook.json").write_text(json.dumps(NOTEBOOK), encoding="utf-8")
    config = tmp_path / "stores.toml"
    config.write_text(STORES_TOML, encoding="utf-8")
    return config, data_dir


def notebook(data_dir: Path) -> dict[str, Any]:
    """The store's content, read from its file, not through the connector."""
    return json.loads((data_dir / "notebook.json").read_text(encoding="utf-8"))


def confirm_from_mail(app: App, sink: MailSink) -> None:
    mails = [m for m in sink.messages() if "confirm" in m["Subject"].lower()]
    body = mails[-1].get_body(("plain",)).get_content()
    match = re.search(r"/verify/(\S+)", body)
    assert match, "the confirmation mail has no link"
    verification.confirm(app, match.group(1))


def run(app: App, bus: InlineBus, sink: MailSink, kind: str, request_id: str) -> dict[str, Any]:
    assert accept(app, document(kind, request_id)).status == "accepted"
    bus.drain()
    if describe_request(app, request_id)["state"] == "awaiting_verification":
        confirm_from_mail(app, sink)
        bus.drain()
    info = describe_request(app, request_id)
    assert info["state"] == "done", info
    return info


def tasks(info: dict[str, Any], phase: str) -> dict[str, dict[str, Any]]:
    return {t["store"]: t for t in info["stores"] if t["phase"] == phase}


def test_without_the_entry_point_the_store_is_refused_naming_the_plugin(
    setup: tuple[Path, Path],
) -> None:
    config, data_dir = setup
    assert "notebook" not in available_plugins()
    with pytest.raises(MappingError, match=r"store 'notebook'.*'notebook' is not installed"):
        load_connectors(config, data_dir)


def test_a_store_added_by_entry_point_and_config_takes_part_in_all_five_request_types(
    state_url: str,
    tmp_path: Path,
    setup: tuple[Path, Path],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, data_dir = setup
    register_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert available_plugins()["notebook"] == ENTRY_POINT

    connectors = load_connectors(config, data_dir)
    assert type(connectors["notebook"]).__name__ == NotebookConnector.__name__
    bus = InlineBus()
    app = make_app(state_url, data_dir, connectors=connectors, bus=bus, smtp_port=sink.port)
    try:
        # access: located, exported into the archive with the store's Art. 15 facts
        info = run(app, bus, sink, "access", "nb-access")
        assert tasks(info, "locate")["notebook"]["result"]["records"] == 4
        with app.sessions() as session:
            export = session.query(ExportRow).filter_by(request_id="nb-access").one()
        archive = zipfile.ZipFile(io.BytesIO(b"".join(open_archive(app, Path(export.path)))))
        records = json.loads(archive.read("notebook/records.json"))["collections"]
        assert [n["id"] for n in records["notes"]] == ["note-1", "note-2"]
        everything = b"".join(archive.read(n) for n in archive.namelist())
        assert b"notebook-secret" not in everything and TWIN.encode() not in everything
        facts = json.loads(archive.read("facts.json"))["stores"]["notebook"]
        assert facts["data"]["notes"]["purpose"] == "Keep the notes you write"

        # correct: the job title changes in the store's file, the look-alike's does not
        info = run(app, bus, sink, "correct", "nb-correct")
        assert tasks(info, "act")["notebook"]["result"]["applied"] == ["job_title"]
        people = {p["id"]: p for p in notebook(data_dir)["people"]}
        assert people["nb-dana-01"]["job_title"] == "Account Director"
        assert "job_title" not in people["nb-twin-02"]

        # opt-out: suppressed at once, and the store's contact preference is off
        info = run(app, bus, sink, "opt_out", "nb-opt-out")
        assert tasks(info, "act")["notebook"]["result"]["updated"] == 1
        people = {p["id"]: p for p in notebook(data_dir)["people"]}
        assert people["nb-dana-01"]["contact_ok"] is False
        assert people["nb-twin-02"]["contact_ok"] is True
        assert not is_contactable(EMAIL, app=app)

        # concern: a case for the privacy team; the store is not touched
        before = notebook(data_dir)
        info = run(app, bus, sink, "concern", "nb-concern")
        assert info["stores"] == [] and notebook(data_dir) == before

        # erase: deleted, receipts retained by law, verified by searching again
        info = run(app, bus, sink, "erase", "nb-erase")
        act = tasks(info, "act")["notebook"]["result"]
        assert act["deleted"] == 3
        assert act["retained"] == [
            {
                "collection": "receipts",
                "count": 1,
                "legal_basis": "Tax law: receipts kept 10 years",
                "period": "10 years",
            }
        ]
        assert tasks(info, "recheck")["notebook"]["result"] == {"remaining": 0, "retained": 1}
        after = notebook(data_dir)
        assert [p["id"] for p in after["people"]] == ["nb-twin-02"]
        assert [n["id"] for n in after["records"]["notes"]] == ["note-3"]
        assert [r["id"] for r in after["records"]["receipts"]] == ["rc-1"]
    finally:
        app.close()
        close_all(connectors)
