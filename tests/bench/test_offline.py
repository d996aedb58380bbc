"""`sluice bench throughput` and `sluice bench latency` in this process, on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from sluice.entrypoints.cli import main

# A small KV cache and context keep each in-process engine quick to build.
SMALL_ENGINE = ["--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20)]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while these run, for the reason tests/bench/conftest.py gives for its server."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_throughput(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", *SMALL_ENGINE, "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                 "--hourly-cost", "2", "--disable-tqdm", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4 and result["dataset_name"] == "random"
    assert result["total_input_tokens"] == 64 and result["total_output_tokens"] == 16  # ignore_eos: exact lengths
    assert result["total_num_tokens"] == 80
    assert result["output_tokens_per_second"] == pytest.approx(16 / result["elapsed_time"])
    assert result["requests_per_second"] == pytest.approx(4 / result["elapsed_time"])
    assert result["cost_per_million_output_tokens"] == pytest.approx(2 / (result["output_tokens_per_second"] * 3600) * 1e6)
    printed = capsys.readouterr().out
    assert "[sluice] output tokens/s:" in printed and "cost per 1M output tokens at $2/h" in printed


def test_bench_latency(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", *SMALL_ENGINE, "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                 "--num-iters-warmup", "0", "--num-iters", "2", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["batch_size"], result["input_len"], result["output_len"], result["num_iters"]) == (2, 8, 4, 2)
    assert len(result["latencies"]) == len(result["prefill_ms"]) == len(result["decode_ms_per_token"]) == 2
    assert result["avg_latency"] == pytest.approx(sum(result["latencies"]) / 2)
    for prefill, whole, decode in zip(result["prefill_ms"], result["latencies"], result["decode_ms_per_token"]):
        assert prefill > 0 and whole > 0
        assert decode == pytest.approx((whole * 1000 - prefill) / 3)
    stats = result["prefill_ms_stats"]
    assert stats["median"] <= stats["p90"] <= stats["p99"]
    printed = capsys.readouterr().out
    assert "prefill (ms)" in printed and "decode per token (ms)" in printed
