"""The load generator, bounded: correctness under concurrency, never a timed assertion.

A shop store of 2,000 users (46,000 rows) on PostgreSQL, a PostgreSQL state database,
real worker processes (2 x 4 threads) over the real Redis and a real SMTP sink; 60
pre-verified requests of all five types arrive at 3 per second, each for a user of its
own. Every request must be done, each must have had exactly one acknowledgement and one
outcome mail, each access exactly one encrypted archive, each erased user must be gone
from the store and everyone else untouched, and no request may be left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.load import LoadOptions, run
from bench.workload import TYPE_MIX, type_counts

pytestmark = [pytest.mark.timeout(300), pytest.mark.postgres, pytest.mark.redis]

RATE, DURATION = 3.0, 20.0
REQUESTS = round(RATE * DURATION)
WARMUP = len(TYPE_MIX)  # one request of each type before the paced ones


def test_a_paced_mixed_load_does_every_request_once_and_starves_none(tmp_path: Path) -> None:
    result = run(
        LoadOptions(
            users=2000,
            mode="rate",
            rate=RATE,
            duration=DURATION,
            mix="mixed",
            processes=2,
            threads=4,
            database="postgresql",
            noop=False,
            timeout=240,
            results_dir=tmp_path,
        )
    )
    real = result["real"]
    kinds = type_counts(REQUESTS)

    # every request done
    assert real["missing"] == [] and real["not_done"] == []
    assert real["states"] == {"done": REQUESTS}
    assert {k: v["n"] for k, v in real["latency_done"].items()} == {**kinds, "all": REQUESTS}

    # no duplicate effect: one email per event, one archive per access, one erasure each
    mail = real["mail"]
    assert mail["duplicate_message_ids"] == []
    assert mail["requests_without_two_mails"] == []
    assert mail["mails"] == 2 * REQUESTS
    exports = real["exports"]
    assert exports["access_requests"] == kinds["access"] + 1  # the warm-up's one too
    assert exports["export_rows"] == exports["access_requests"]
    assert exports["duplicate_export_rows"] == []
    assert exports["without_archive"] == [] and exports["extra_files"] == {}
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
    assert len(requests) == REQUESTS
    assert real["starvation"]["unfinished"] == []
    for r in requests:
        assert r["state"] == "done" and r["mail_s"] is not None, r
        assert 0 <= r["done_s"] <= r["mail_s"] <= real["wall_s"], r
    assert "request_rekicked" not in real["scheduler_log"]

    assert result["problems"] == [] and result["ok"]
    written = json.loads(Path(result["json_file"]).read_text())
    assert written["real"]["completed"] == REQUESTS
    assert Path(result["plot_file"]).stat().st_size > 0
