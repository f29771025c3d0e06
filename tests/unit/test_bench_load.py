"""The load benchmark's profiler options: what it asks py-spy for, and how it reads the
stacks back (py-spy itself is not a dependency; the real runs are in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

from bench.load import PySpy, parse_args, stacks_summary


def test_py_spy_options_reach_the_command_line(tmp_path: Path) -> None:
    opts = parse_args(["--py-spy", "--py-spy-idle"])
    assert opts.py_spy and opts.py_spy_idle and not opts.py_spy_gil
    out = tmp_path / "out.txt"

    idle = PySpy({"worker": 42}, out, idle=opts.py_spy_idle).command("py-spy", 42, out)
    assert idle[:3] == ["py-spy", "record", "--pid"] and idle[3] == "42"
    assert "--idle" in idle and "--threads" in idle and "--gil" not in idle
    assert idle[-2:] == ["--output", str(out)]

    gil = PySpy({"worker": 42}, out, gil=True).command("py-spy", 42, out)
    assert "--gil" in gil and "--idle" not in gil and "--threads" not in gil

    plain = PySpy({"worker": 42}, out).command("py-spy", 42, out)
    assert not {"--gil", "--idle", "--threads"} & set(plain)


def test_stacks_from_every_thread_add_up_by_function(tmp_path: Path) -> None:
    """With --py-spy-idle each stack starts with its process and thread: those frames
    name no function and are left out of the summary."""
    collapsed = tmp_path / "stacks.txt"
    collapsed.write_text(
        'process 1:"dramatiq";thread (11): Thread-1;run (dramatiq/worker.py);'
        "send_email (pipeline/notify.py) 3\n"
        'process 1:"dramatiq";thread (12): Thread-2;run (dramatiq/worker.py) 1\n'
        "run (dramatiq/worker.py);intake (pipeline/intake.py) 4\n"
    )
    summary = stacks_summary(collapsed)
    assert summary["samples"] == 8
    own = {row["function"]: row["samples"] for row in summary["top_own"]}
    assert own == {
        "intake (pipeline/intake.py)": 4,
        "send_email (pipeline/notify.py)": 3,
        "run (dramatiq/worker.py)": 1,
    }
    cumulative = {row["function"]: row["samples"] for row in summary["top_cumulative"]}
    assert cumulative["run (dramatiq/worker.py)"] == 8
    packages = {row["function"]: row["samples"] for row in summary["own_by_package"]}
    assert packages == {"pipeline": 7, "dramatiq": 1}
