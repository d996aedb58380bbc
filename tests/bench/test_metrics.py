"""Summary arithmetic on hand-made records: vLLM's definitions of TTFT, TPOT, ITL, goodput."""

from __future__ import annotations

import pytest

from sluice.bench.client import RequestRecord
from sluice.bench.metrics import (
    count_output_tokens, cost_per_million_tokens, max_concurrency, parse_goodput, summarize,
)


def records() -> list[RequestRecord]:
    a = RequestRecord(0, 10, 3, start_s=0.0, ttft_s=0.1, e2el_s=0.5, chunk_times_s=[0.1, 0.2, 0.4],
                      output_tokens=3, usage_output_tokens=3, success=True)
    b = RequestRecord(1, 20, 2, start_s=0.3, ttft_s=0.2, e2el_s=0.3, chunk_times_s=[0.2, 0.3],
                      output_tokens=2, usage_output_tokens=2, success=True)
    c = RequestRecord(2, 30, 2, start_s=0.35, e2el_s=0.05, error="HTTP 503: queue full")
    return [a, b, c]


def test_summary_follows_vllm_definitions():
    s = summarize(records(), duration=2.0, percentiles=[50, 99], goodput={"ttft": 150})
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"HTTP 503: queue full": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 5)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 2.5 and s["total_token_throughput"] == 17.5
    assert s["mean_ttft_ms"] == pytest.approx(150) and s["p50_ttft_ms"] == pytest.approx(150)
    assert s["p99_ttft_ms"] == pytest.approx(199)  # numpy's linear interpolation, as vLLM
    # TPOT per request: (e2e - ttft) / (tokens - 1) -> 200 ms and 100 ms.
    assert s["mean_tpot_ms"] == pytest.approx(150) and s["median_tpot_ms"] == pytest.approx(150)
    # ITL pools every gap: 100, 200 (a) and 100 (b).
    assert s["mean_itl_ms"] == pytest.approx(400 / 3) and s["median_itl_ms"] == pytest.approx(100)
    assert s["mean_e2el_ms"] == pytest.approx(400)
    assert s["request_goodput"] == 0.5  # only a's TTFT (100 ms) is within 150 ms
    assert s["max_concurrent_requests"] == 3
    assert "cost_per_million_output_tokens" not in s


def test_goodput_itl_uses_each_requests_mean_gap():
    s = summarize(records(), duration=1.0, goodput={"itl": 120})
    assert s["request_goodput"] == 1.0  # b's mean gap is 100 ms; a's is 150 ms


def test_cost_follows_the_guides_formula():
    assert cost_per_million_tokens(2.0, 100.0) == pytest.approx(2.0 / (100.0 * 3600) * 1e6)
    s = summarize(records(), duration=1.0, hourly_cost=3.6)
    assert s["cost_per_million_output_tokens"] == pytest.approx(3.6 / (5 * 3600) * 1e6)
    assert cost_per_million_tokens(1.0, 0.0) is None


def test_max_concurrency_back_to_back_is_not_overlap():
    a = RequestRecord(0, 1, 1, start_s=0.0, e2el_s=1.0)
    b = RequestRecord(1, 1, 1, start_s=1.0, e2el_s=1.0)
    assert max_concurrency([a, b]) == 1
    assert max_concurrency([a, RequestRecord(2, 1, 1, start_s=0.5, e2el_s=1.0)]) == 2


def test_empty_metrics_are_none_not_zero():
    s = summarize([records()[2]], duration=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    assert s["total_output_tokens"] == s["total_output_tokens_retokenized"] == 0


def test_output_tokens_are_the_servers_usage_else_the_returned_text(tokenizer):
    """vLLM's total_output_tokens counts the server's usage; the re-tokenized count sits beside it."""
    recs = records()
    recs[0].text, recs[1].text = "hello world", ""
    recs[1].usage_output_tokens = None
    count_output_tokens(recs, tokenizer)
    retokenized = len(tokenizer.encode("hello world", add_special_tokens=False))
    assert (recs[0].output_tokens, recs[0].output_tokens_retokenized) == (3, retokenized)
    assert recs[1].output_tokens == recs[1].output_tokens_retokenized == 0
    s = summarize(recs, duration=1.0)
    assert (s["total_output_tokens"], s["total_output_tokens_retokenized"]) == (3, retokenized)


def test_parse_goodput():
    assert parse_goodput(["ttft:200", "itl:50", "e2el:1e4"]) == {"ttft": 200, "itl": 50, "e2el": 10000}
    for bad, message in (("ttft=5", "is not METRIC:MS"), ("foo:5", "is not METRIC:MS"),
                         ("ttft:x", "not a number"), ("ttft:0", "must be > 0")):
        with pytest.raises(ValueError, match=message):
            parse_goodput([bad])
