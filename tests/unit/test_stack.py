"""LocalStack's worker groups: named as their log files, each running the worker command."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.stack import LocalStack, group_names


def test_one_worker_group_is_named_worker_as_before(tmp_path: Path) -> None:
    stack = LocalStack(env={}, log_dir=tmp_path)
    assert stack.worker_names == ("worker",)


def test_each_worker_group_runs_the_worker_command_with_its_processes_and_threads(
    tmp_path: Path,
) -> None:
    stack = LocalStack(env={}, log_dir=tmp_path, processes=2, threads=3, worker_groups=3)
    assert stack.worker_names == ("worker", "worker-2", "worker-3")
    for name in stack.worker_names:
        assert stack._command(name) == ("worker", "--processes", "2", "--threads", "3")
    assert stack._command("scheduler") == ("scheduler",)


def test_a_stack_without_worker_groups_is_refused_with_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass 1 or more worker groups"):
        LocalStack(env={}, log_dir=tmp_path, worker_groups=0)


def test_group_names_number_the_groups_after_the_first() -> None:
    assert group_names("noop", 2) == ("noop", "noop-2")
