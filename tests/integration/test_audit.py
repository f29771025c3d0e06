"""The audit log is tamper-evident (invariant 7, R28): any edit or removal is named."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from pipeline import audit
from pipeline.cli import main
from pipeline.db import AuditRow, transaction
from tests.conftest import make_app


@pytest.fixture
def app(state_url, tmp_path):
    application = make_app(state_url, tmp_path / "data")
    yield application
    application.close()


def write(app, count: int) -> list[int]:
    for i in range(count):
        with transaction(app.sessions) as session:
            audit.record(
                session, "request_state_changed", request_id=f"r-{i % 7}", step=i, to="done"
            )
    with app.sessions() as session:
        return list(session.scalars(select(AuditRow.id).order_by(AuditRow.id)))


def check(app) -> audit.ChainReport:
    with app.sessions() as session:
        return audit.verify_chain(session)


def test_the_chain_is_intact_after_many_records(app):
    write(app, 120)
    report = check(app)
    assert report.intact, report
    assert report.entries == 120


def test_the_chain_is_verified_across_batches(app):
    write(app, 25)
    with app.sessions() as session:
        assert audit.verify_chain(session, batch=7).entries == 25


def test_each_entry_links_to_the_one_before(app):
    write(app, 5)
    with app.sessions() as session:
        rows = session.execute(select(AuditRow).order_by(AuditRow.id)).scalars().all()
    assert rows[0].prev_hash == audit.GENESIS
    for before, after in zip(rows, rows[1:], strict=False):
        assert after.prev_hash == before.hash


def test_an_empty_log_is_intact(app):
    assert check(app).intact and check(app).entries == 0


def test_editing_a_row_detail_is_caught_and_names_that_row(app):
    ids = write(app, 10)
    target = ids[4]
    with app.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET detail = :d WHERE id = :i"),
            {"d": '{"step": 999, "to": "done"}', "i": target},
        )
    report = check(app)
    assert not report.intact
    assert report.first_broken_id == target
    assert "content" in report.problem


def test_editing_a_row_action_or_actor_is_caught(app):
    ids = write(app, 4)
    with app.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'someone' WHERE id = :i"), {"i": ids[2]})
    assert check(app).first_broken_id == ids[2]


def test_rehashing_an_edited_row_breaks_the_link_of_the_next_one(app):
    ids = write(app, 6)
    with app.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET hash = :h WHERE id = :i"), {"h": "f" * 64, "i": ids[2]}
        )
    report = check(app)
    assert report.first_broken_id == ids[2]


def test_deleting_a_middle_row_is_caught(app):
    ids = write(app, 10)
    with app.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE id = :i"), {"i": ids[5]})
    report = check(app)
    assert not report.intact
    assert report.first_broken_id == ids[6]
    assert "link" in report.problem


def test_appending_after_a_check_continues_the_chain(app):
    write(app, 3)
    assert check(app).intact
    write(app, 3)
    assert check(app).entries == 6 and check(app).intact


def cli_env(app, tmp_path: Path) -> dict[str, str]:
    return {
        "PRIVACY_DATABASE_URL": app.settings.state_url,
        "PRIVACY_DATA_DIR": str(tmp_path / "data"),
        "PRIVACY_LOG_FORMAT": "json",
    }


def test_the_audit_verify_command_reports_an_intact_chain(app, tmp_path):
    write(app, 8)
    result = CliRunner().invoke(main, ["audit", "verify"], env=cli_env(app, tmp_path))
    assert result.exit_code == 0, result.output
    assert "intact: 8 entries" in result.output


def test_the_audit_verify_command_exits_1_naming_the_broken_entry(app, tmp_path):
    ids = write(app, 8)
    with app.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET request_id = 'r-x' WHERE id = :i"), {"i": ids[3]}
        )
    result = CliRunner().invoke(main, ["audit", "verify"], env=cli_env(app, tmp_path))
    assert result.exit_code == 1
    assert f"BROKEN at entry {ids[3]}" in result.output


def test_entries_of_a_transaction_that_rolls_back_are_never_written(app):
    write(app, 2)
    with pytest.raises(RuntimeError), transaction(app.sessions) as session:
        audit.record(session, "request_state_changed", request_id="r-x", step=99)
        raise RuntimeError("the stage failed")
    with transaction(app.sessions) as session:  # the same pooled connection, reused
        audit.record(session, "request_state_changed", request_id="r-y", step=100)
    with app.sessions() as session:
        steps = [r.detail["step"] for r in session.scalars(select(AuditRow).order_by(AuditRow.id))]
    assert steps == [0, 1, 100]
    assert check(app).intact


def test_many_entries_of_one_transaction_chain_in_the_order_they_were_recorded(app):
    with transaction(app.sessions) as session:
        for step in range(5):
            audit.record(session, "request_state_changed", request_id="r-1", step=step)
        assert session.scalars(select(AuditRow)).all() == []  # written at commit
    with app.sessions() as session:
        steps = [r.detail["step"] for r in session.scalars(select(AuditRow).order_by(AuditRow.id))]
    assert steps == [0, 1, 2, 3, 4]
    assert check(app).entries == 5 and check(app).intact


def test_stages_committing_at_once_from_many_threads_keep_one_intact_chain(app):
    def stage(n: int) -> None:
        for i in range(15):
            with transaction(app.sessions) as session:
                audit.record(session, "request_state_changed", request_id=f"r-{n}", step=i)
                audit.record(session, "store_locate_completed", request_id=f"r-{n}", step=i)

    threads = [threading.Thread(target=stage, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = check(app)
    assert report.intact, report
    assert report.entries == 6 * 15 * 2
