"""Keys rotate without downtime (R30): a new key takes over while requests flow, old
ciphertexts move to it in the background, and the old key leaves only when unused."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import rotation
from pipeline.archive import open_archive
from pipeline.cli import main
from pipeline.db import ExportRow
from pipeline.intake import accept
from pipeline.requests import subject_of
from pipeline.status import describe_request
from tests.conftest import make_app
from tests.integration.support import EMAIL, QuietBus, presigned, request_row, stores


@pytest.fixture
def bus():
    return QuietBus()


@pytest.fixture
def app(state_url, tmp_path, bus):
    application = make_app(state_url, tmp_path / "data", bus=bus, connectors=stores())
    yield application
    application.close()


def run(app, bus, kind: str, request_id: str) -> None:
    accept(app, presigned(app, kind, request_id))
    bus.drain()
    assert describe_request(app, request_id)["state"] == "done"


def test_rotation_moves_everything_to_the_new_key_and_retires_the_old(app, bus):
    run(app, bus, "access", "before-access")
    run(app, bus, "concern", "before-concern")
    assert set(rotation.usage(app)) == {"k1"}

    new = rotation.rotate(app)
    assert app.keys.ring.active == new  # this process follows the file without a restart
    run(app, bus, "opt_out", "during-opt-out")
    assert app.keys.ring.key_id_of(request_row(app, "during-opt-out").subject_enc) == new
    with pytest.raises(rotation.KeyInUse, match="reencrypt"):
        rotation.retire(app, "k1")

    assert rotation.reencrypt(app, batch=3) > 0
    assert set(rotation.usage(app)) == {new}
    assert rotation.reencrypt(app) == 0  # nothing left to move
    rotation.retire(app, "k1")
    assert app.keys.ring.key_ids == (new,)

    for request_id in ("before-access", "before-concern", "during-opt-out"):
        assert subject_of(app, request_row(app, request_id))["email"] == EMAIL
    with app.sessions() as session:
        export = session.query(ExportRow).filter_by(request_id="before-access").one()
    archive = zipfile.ZipFile(io.BytesIO(b"".join(open_archive(app, Path(export.path)))))
    assert "facts.json" in archive.namelist()


def test_the_active_key_cannot_be_retired(app):
    with pytest.raises(rotation.KeyInUse, match="active"):
        rotation.retire(app, app.keys.ring.active)


def test_the_cli_rotates_reports_usage_and_refuses_to_retire_a_key_in_use(app, bus, state_url):
    run(app, bus, "concern", "cli-concern")
    env = {"PRIVACY_DATA_DIR": str(app.settings.data_dir), "PRIVACY_DATABASE_URL": state_url}
    cli = CliRunner()
    rotated = cli.invoke(main, ["keys", "rotate"], env=env)
    assert rotated.exit_code == 0 and "k2" in rotated.output
    usage = cli.invoke(main, ["keys", "usage"], env=env)
    assert "k1: " in usage.output and "k2 (active)" in usage.output
    refused = cli.invoke(main, ["keys", "retire", "k1"], env=env)
    assert refused.exit_code == 1 and "still protects" in refused.output
    assert cli.invoke(main, ["keys", "reencrypt"], env=env).exit_code == 0
    assert cli.invoke(main, ["keys", "retire", "k1"], env=env).exit_code == 0
