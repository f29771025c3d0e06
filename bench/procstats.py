"""Memory and CPU of process groups and of the machine, from /proc (Linux, no extra deps)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after it
    return raw[raw.rindex(")") + 2 :].split()


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class GroupSnapshot:
    processes: int
    rss_kb: int  # resident now, summed
    hwm_kb: int  # each process's peak resident, summed
    cpu_seconds: float  # user + system, summed over the live members


def group_snapshot(*pgids: int) -> GroupSnapshot:
    """Every live process in the process groups `pgids` (LocalStack children and their
    forks), summed."""
    pids = []
    cpu_ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # after the name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12)
        if fields is None or int(fields[2]) not in pgids:
            continue
        pids.append(int(entry.name))
        cpu_ticks += int(fields[11]) + int(fields[12])
    return GroupSnapshot(
        processes=len(pids),
        rss_kb=sum(_status_kb(p, "VmRSS") for p in pids),
        hwm_kb=sum(_status_kb(p, "VmHWM") for p in pids),
        cpu_seconds=cpu_ticks / _TICKS,
    )


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return (total - idle) / _TICKS, total / _TICKS
