"""Sweep parsing and the choice of level, on a recorded result set (sweep_concurrency.json):

    concurrency   TTFT p95   ITL p99 (ms)
              1     3184.7    1440.9
              2     6602.5    2077.7
              4     8927.8    1549.3
              8    11187.5    2014.0
"""

from __future__ import annotations

import copy
import json
import os

import pytest

from sluice.bench.sweep import (
    choose_level, meets_slos, parse_slos, parse_sweep, summary_key, sweep_table, verdict,
)


@pytest.fixture(scope="module")
def levels() -> list[dict]:
    with open(os.path.join(os.path.dirname(__file__), "sweep_concurrency.json")) as f:
        recorded = json.load(f)
    assert recorded["mode"] == "concurrency"
    return recorded["levels"]


@pytest.mark.parametrize("slos, chosen", [
    ({"ttft_p95": 5000}, 1),                       # 2 is the first to miss
    ({"ttft_p95": 9000}, 4),                       # 8 misses
    ({"ttft_p95": 9000, "itl_p99": 2100}, 4),      # every target counts
    ({"ttft_p95": 20000, "itl_p99": 2100}, 8),     # all meet: the highest
    ({"ttft_p95": 20000, "itl_p99": 1600}, 1),     # 4 meets again after 2 missed: noise, not capacity
    ({"ttft_p50": 2000, "e2el_mean": 20000}, 1),   # medians and means work too
    ({"ttft_p95": 100}, None),                     # even concurrency 1 misses
])
def test_choice_on_the_recorded_sweep(levels, slos, chosen):
    result = choose_level(levels, slos)
    assert (result["level"] if result else None) == chosen
    assert choose_level(list(reversed(levels)), slos) == result  # order of the list does not matter


def test_a_level_with_failed_requests_misses(levels):
    slos = {"ttft_p95": 20000}
    broken = copy.deepcopy(levels)
    broken[2]["failed"] = 1  # concurrency 4
    assert choose_level(levels, slos)["level"] == 8
    assert choose_level(broken, slos)["level"] == 2
    assert not meets_slos({**levels[0], "completed": 0}, slos)


def test_table_and_verdict(levels):
    slos = {"ttft_p95": 9000, "itl_p99": 2100}
    table = sweep_table("concurrency", levels, slos)
    header, rule, *rows = table.splitlines()
    assert "meets SLO" in header and "$/1M out" in header and set(rule) == {"-"}
    assert [row.split()[0] for row in rows] == ["1", "2", "4", "8"]
    assert [row.split()[-2] for row in rows] == ["yes", "yes", "yes", "no"]
    assert "6602.5" in rows[1] and "2077.7" in rows[1]  # TTFT p95 and ITL p99 of concurrency 2
    assert verdict("concurrency", levels, slos).startswith(
        "Highest concurrency meeting ttft_p95 <= 9000 ms, itl_p99 <= 2100 ms: 4 (0.20 req/s")
    assert verdict("concurrency", levels, {"ttft_p95": 1}).startswith("No concurrency level meets ttft_p95 <= 1 ms")
    assert "met them too" not in verdict("concurrency", levels, slos)  # nothing passed above a miss
    noisy = verdict("concurrency", levels, {"ttft_p95": 20000, "itl_p99": 1600})
    assert noisy.startswith("Highest concurrency meeting ttft_p95 <= 20000 ms, itl_p99 <= 1600 ms: 1 (")
    assert "; concurrency 4 met them too, above a level that missed" in noisy


def test_parse_sweep():
    assert parse_sweep("concurrency:8,1,2") == ("concurrency", [1, 2, 8])
    assert parse_sweep("rate:0.5,2") == ("rate", [0.5, 2.0])
    for bad, message in (("concurrency", "is not concurrency:N"), ("rate:", "at least one level"),
                         ("rate:1,x", "must be numbers"), ("rate:0,1", "every level > 0"),
                         ("concurrency:2,2", "distinct"), ("concurrency:0.5", "whole numbers")):
        with pytest.raises(ValueError, match=message):
            parse_sweep(bad)


def test_parse_slos():
    assert parse_slos(["ttft_p95:500", "itl_p99.9:50", "e2el_mean:2000", "tpot_median:30"]) == {
        "ttft_p95": 500, "itl_p99.9": 50, "e2el_mean": 2000, "tpot_median": 30}
    assert [summary_key(k) for k in ("ttft_p95", "itl_p99.9", "e2el_mean")] == [
        "p95_ttft_ms", "p99.9_itl_ms", "mean_e2el_ms"]
    for bad, message in (("ttft_q95:5", "is not METRIC_STAT:MS"), ("ttft:5", "is not METRIC_STAT:MS"),
                         ("ttft_p150:5", r"in \[0, 100\]"), ("ttft_p95:-1", "must be > 0")):
        with pytest.raises(ValueError, match=message):
            parse_slos([bad])
