"""A bounded run of the intake fuzzer (bench/fuzz_intake.py) with its coverage-guided
engine: random and mutated documents through the real intake stage and state database.
Nothing may crash, every rejection must carry a known code and a reason that echoes no
value and be recorded, and every intact valid document must be accepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# seconds per engine: the coverage-guided engine tries fewer inputs per second (about
# 190 alone on this machine, 75 in a slow hour of a full test run, where 15 s reached
# only 7 rejection codes); its run is long enough to reach 8 on such an hour too
SECONDS = {"atheris": 30, "random": 15}


@pytest.mark.parametrize("engine", ["atheris", "random"])
def test_a_bounded_fuzz_run_over_intake_finds_nothing(engine, tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "fuzz_intake.py"),
            "--engine",
            engine,
            "--seconds",
            str(SECONDS[engine]),
            "--seed",
            "11",
            "--report",
            str(report_path),
            "--crashes",
            str(tmp_path / "inputs"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["crashes"] == [] and report["wrong"] == [], report
    assert done.returncode == 0, done.stdout[-3000:]
    assert report["tried"] >= 200  # a loaded CI machine runs a few hundred a second
    assert report["accepted"] > 0 and report["intact_tried"] > 0
    assert len(report["codes"]) >= 8  # the mutations reach many different rejections
    assert report["rejection_rows"] == report["rejected"]
    assert report["request_rows"] == report["accepted"]
    assert not list((tmp_path / "inputs").glob("*"))
