"""The load generator, bounded: correctness under concurrency, never a timed assertion.

A shop store of 2,000 users (46,000 rows) on PostgreSQL, a PostgreSQL state database,
real worker processes over the real Redis and a real SMTP sink: one group of 2 x 4
threads, or two groups of 1 x 2 (as two hosts would run them, sharing the broker and the
state database). Pre-verified requests of all five types arrive at 3 per second, each
for a user of its own. Every request must be done, each must have had exactly one
acknowledgement and one outcome mail, each access exactly one encrypted archive, each
erased user must be gone from the store and everyone else untouched, no request may be
left behind, and with two groups both must have done part of the work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.load import LoadOptions, run
from bench.workload import TYPE_MIX, type_counts

pytestmark = [pytest.mark.timeout(300), pytest.mark.postgres, pytest.mark.redis]

RATE = 3.0
WARMUP = len(TYPE_MIX)  # one request of each type before the paced ones


@dataclass(frozen=True)
class Workers:
    groups: int
    processes: int  # per group
    threads: int
    duration: float  # seconds of arrivals at RATE


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param(Workers(groups=1, processes=2, threads=4, duration=20.0), id="one-group"),
        pytest.param(Workers(groups=2, processes=1, threads=2, duration=12.0), id="two-groups"),
    ],
)
def test_a_paced_mixed_load_does_every_request_once_and_starves_none(
    tmp_path: Path, workers: Workers
) -> None:
    total = round(RATE * workers.duration)
    result = run(
        LoadOptions(
            users=2000,
            mode="rate",
            rate=RATE,
            duration=workers.duration,
            mix="mixed",
            processes=workers.processes,
            threads=workers.threads,
            worker_groups=workers.groups,
            database="postgresql",
            noop=False,
            timeout=240,
            results_dir=tmp_path,
        )
    )
    real = result["real"]
    kinds = type_counts(total)

    # every request done
    assert real["missing"] == [] and real["not_done"] == []
    assert real["states"] == {"done": total}
    assert {k: v["n"] for k, v in real["latency_done"].items()} == {**kinds, "all": total}

    # no duplicate effect: one email per event, one archive per access, one erasure each
    mail = real["mail"]
    assert mail["duplicate_message_ids"] == []
    assert mail["requests_without_two_mails"] == []
    assert mail["mails"] == 2 * total
    exports = real["exports"]
    assert exports["access_requests"] == kinds["access"] + 1  # the warm-up's one too
    assert exports["export_rows"] == exports["access_requests"]
    assert exports["duplicate_export_rows"] == []
    assert exports["without_archive"] == [] and exports["extra_files"] == []
    assert exports["unencrypted"] == []
    effects = result["store"]["effects"]
    assert effects["erased"] == kinds["erase"] + 1
    assert effects["erased_still_identifiable"] == [] and effects["erased_found_by_email"] == []
    assert effects["erased_rows_left"] == {}
    assert effects["erased_orders_retained"] == effects["erased_orders_expected"]
    assert effects["not_corrected"] == [] and effects["still_opted_in"] == []
    assert effects["others_changed"] == []

    # no request starved: each one finished, within the run, none went quiet long enough
    # for the reconciler to kick it
    requests = real["per_request"]
    assert len(requests) == total
    assert real["starvation"]["unfinished"] == []
    for r in requests:
        assert r["state"] == "done" and r["mail_s"] is not None, r
        assert 0 <= r["done_s"] <= r["mail_s"] <= real["wall_s"], r
    assert "request_rekicked" not in real["scheduler_log"]

    # every worker group took part: each ran store tasks
    groups = real["worker_groups"]
    assert list(groups) == ["worker", "worker-2"][: workers.groups]
    for name, group in groups.items():
        assert group["processes"] == workers.processes + 1, name  # and dramatiq's main one
        assert group["log"].get("store_task_completed", 0) > 0, (name, group)
    assert result["options"]["worker_groups"] == workers.groups

    assert result["problems"] == [] and result["ok"]
    written = json.loads(Path(result["json_file"]).read_text())
    assert written["real"]["completed"] == total
    assert Path(result["plot_file"]).stat().st_size > 0
