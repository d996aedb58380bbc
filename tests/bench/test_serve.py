"""`sluice bench serve` against a real sluice server: every dataset and arrival mode on tiny runs,
with the saved JSON checked for presence and consistency of its fields."""

from __future__ import annotations

import json

import pytest

from sluice.bench.sweep import choose_level

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATS = ("p50", "p90", "p95", "p99")


def check_run(result: dict, tokenizer, num_prompts: int, failed: int = 0) -> list[dict]:
    """Fields every run must have, consistent with one another; returns the successful records."""
    records = result["requests"]
    assert len(records) == result["num_prompts"] == num_prompts
    assert result["completed"] == num_prompts - failed and result["failed"] == failed
    assert sum(result["errors"].values()) == failed
    done = [r for r in records if r["success"]]
    for r in done:
        assert r["error"] == ""
        # Headline count: the server's usage (as vLLM's); the returned text re-tokenized sits beside it.
        assert r["usage_output_tokens"] is not None and r["usage_prompt_tokens"] is not None
        assert r["output_tokens"] == r["usage_output_tokens"]
        assert r["output_tokens_retokenized"] == len(tokenizer.encode(r["text"], add_special_tokens=False))
        assert 0 < r["ttft_s"] <= r["e2el_s"]
        assert r["chunk_times_s"][0] == r["ttft_s"] and r["chunk_times_s"] == sorted(r["chunk_times_s"])
        assert len(r["itl_s"]) == len(r["chunk_times_s"]) - 1
        assert r["start_s"] >= 0
    assert result["total_output_tokens"] == sum(r["usage_output_tokens"] for r in done)
    assert result["total_output_tokens_retokenized"] == sum(r["output_tokens_retokenized"] for r in done)
    assert result["total_input_tokens"] == sum(r["prompt_len"] for r in done)
    assert result["total_input_tokens_usage"] == sum(r["usage_prompt_tokens"] for r in done)
    assert result["duration"] > 0
    assert result["request_throughput"] == pytest.approx(len(done) / result["duration"])
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / result["duration"])
    assert 1 <= result["max_concurrent_requests"] <= num_prompts
    for metric in ("ttft", "tpot", "itl", "e2el"):
        values = [result[f"{s}_{metric}_ms"] for s in STATS]
        assert values == sorted(values), metric
        assert result[f"median_{metric}_ms"] == pytest.approx(result[f"p50_{metric}_ms"])
        assert values[0] > 0
    return done


def check_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_random_fixed_concurrency_ignore_eos(bench, tokenizer, tmp_path, capsys):
    result = bench("--dataset-name", "random", "--num-prompts", "4", "--random-input-len", "32",
                   "--random-output-len", "8", "--max-concurrency", "2", "--ignore-eos",
                   "--goodput", "ttft:600000", "e2el:600000", "--hourly-cost", "2.5", "--plot", str(tmp_path / "plots"))
    done = check_run(result, tokenizer, 4)
    assert result["max_concurrency"] == 2 and result["max_concurrent_requests"] <= 2
    assert result["request_rate"] == "inf"
    for r in done:
        # Exact input lengths: what the dataset counted is what the server counted.
        assert r["prompt_len"] == r["usage_prompt_tokens"] == 32
        # ignore_eos: the server made exactly the asked length; re-tokenizing its text may merge a pair.
        assert r["expected_output_len"] == r["usage_output_tokens"] == r["output_tokens"] == 8
        assert abs(r["output_tokens_retokenized"] - 8) <= 1
        assert r["finish_reason"] == "length"
    assert result["goodput_targets_ms"] == {"ttft": 600000, "e2el": 600000}
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # every request met them
    assert result["cost_per_million_output_tokens"] == pytest.approx(2.5 / (result["output_throughput"] * 3600) * 1e6)
    check_png(tmp_path / "plots" / "latency_cdf.png")
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Cost per 1M output tokens" in printed
    assert "P95 TTFT (ms)" in printed and "Request goodput (req/s)" in printed


def test_prefix_repetition_hits_the_prefix_cache(bench, tokenizer):
    # One at a time, so every request after the first of its group finds its prefix cached.
    result = bench("--dataset-name", "prefix-repetition", "--num-prompts", "4", "--prefix-repetition-prefix-len", "64",
                   "--prefix-repetition-suffix-len", "8", "--prefix-repetition-num-prefixes", "2",
                   "--prefix-repetition-output-len", "4", "--max-concurrency", "1", "--ignore-eos")
    done = check_run(result, tokenizer, 4)
    assert result["max_concurrent_requests"] == 1
    groups: dict[int, list[dict]] = {}
    for r in sorted(done, key=lambda r: r["start_s"]):
        groups.setdefault(r["prefix_index"], []).append(r)
    assert sorted(groups) == [0, 1] and all(len(g) == 2 for g in groups.values())
    for group in groups.values():
        # The 64-token prefix holds at least three full 16-token blocks whatever the boundary merges.
        assert group[1]["cached_tokens"] >= 48
    assert result["total_cached_tokens"] == sum(r["cached_tokens"] for r in done)


def test_sharegpt_chat_constant_rate(bench, tokenizer, tmp_path):
    conversations = [
        {"conversations": [{"from": "human", "value": "Name three rivers in Europe, please."},
                           {"from": "gpt", "value": "The Danube, the Rhine and the Seine."}]},
        {"conversations": [{"from": "human", "value": "What is the capital city of France?"},
                           {"from": "gpt", "value": "The capital of France is Paris."}]},
        {"conversations": [{"from": "human", "value": "Say hello to me in Spanish, please."},
                           {"from": "gpt", "value": "Hola! How are you today?"}]},
        {"conversations": [{"from": "human", "value": "Only one turn here, so it is skipped."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Too short to keep."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    rate = 10.0
    result = bench("--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "3",
                   "--endpoint-type", "chat", "--request-rate", str(rate), "--burstiness", "inf")
    done = check_run(result, tokenizer, 3)
    assert result["endpoint_type"] == "chat" and result["url"].endswith("/v1/chat/completions")
    assert result["burstiness"] == "inf" and result["request_rate"] == rate
    replies = [len(tokenizer.encode(c["conversations"][1]["value"], add_special_tokens=False))
               for c in conversations[:3]]
    starts = sorted(r["start_s"] for r in done)
    for i, start in enumerate(starts):
        assert start >= i / rate - 0.005  # constant rate: request i is due at i / rate
    assert sorted(r["expected_output_len"] for r in done) == sorted(replies)  # each usable conversation once
    for r in done:
        assert r["usage_output_tokens"] <= r["expected_output_len"]
        assert r["usage_prompt_tokens"] > r["prompt_len"]  # the chat template wraps the prompt


def test_custom_poisson_with_a_failing_request(bench, tokenizer, tmp_path):
    lines = [{"prompt": "Tell me a short story about a cat.", "output_len": 4},
             {"prompt": "hello " * 1100, "output_len": 4},  # over the server's --max-model-len 1024
             {"prompt": "Why is the sky blue?", "output_len": 5},
             {"prompt": "Count from one to five.", "output_len": 6}]
    path = tmp_path / "custom.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = bench("--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts", "4",
                   "--request-rate", "20", "--burstiness", "1", "--ignore-eos")
    done = check_run(result, tokenizer, 4, failed=1)
    [failed] = [r for r in result["requests"] if not r["success"]]
    assert failed["index"] == 1 and failed["error"].startswith("HTTP 400")
    assert "max_model_len is 1024" in failed["error"]
    assert result["errors"] == {failed["error"]: 1}
    assert [r["usage_output_tokens"] for r in done] == [4, 5, 6]
    assert result["request_rate"] == 20 and result["burstiness"] == 1


def test_concurrency_sweep_meets_targets(bench, tokenizer, tmp_path, capsys):
    slos = {"ttft_p95": 600000.0, "itl_p99": 600000.0}
    result = bench("--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "4", "--ignore-eos",
                   "--sweep", "concurrency:1,2", "--slo", *(f"{k}:{v:g}" for k, v in slos.items()),
                   "--plot", str(tmp_path / "plots"))
    sweep = result["sweep"]
    assert sweep["mode"] == "concurrency" and sweep["slo_targets_ms"] == slos
    assert [s["level"] for s in sweep["levels"]] == [1, 2]
    for summary, run in zip(sweep["levels"], result["runs"]):
        assert run["level"] == summary["level"] == summary["max_concurrency"]
        check_run({**summary, "requests": run["requests"]}, tokenizer, 2)
        assert summary["max_concurrent_requests"] <= summary["level"] and summary["meets_slo"] is True
    assert sweep["chosen_level"] == 2 == choose_level(sweep["levels"], slos)["level"]
    printed = capsys.readouterr().out
    assert "meets SLO" in printed and "Highest concurrency meeting ttft_p95 <= 600000 ms" in printed
    for name in ("latency_cdf.png", "sweep_throughput.png", "sweep_latency.png"):
        check_png(tmp_path / "plots" / name)


def test_rate_sweep_where_no_level_meets(bench, tokenizer, capsys):
    result = bench("--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "4", "--ignore-eos",
                   "--sweep", "rate:5,10", "--slo", "ttft_p95:0.001")
    sweep = result["sweep"]
    assert [s["level"] for s in sweep["levels"]] == [5, 10]
    assert [s["request_rate"] for s in sweep["levels"]] == [5, 10]
    assert all(s["meets_slo"] is False for s in sweep["levels"]) and sweep["chosen_level"] is None
    for summary, run in zip(sweep["levels"], result["runs"]):
        check_run({**summary, "requests": run["requests"]}, tokenizer, 2)
    assert "No rate level meets ttft_p95 <= 0.001 ms" in capsys.readouterr().out
