"""Flag checks at the edge (errors name the flag and the limit) and the arrival schedules."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.bench.serve import arrival_times
from sluice.entrypoints.cli import main
from tests.server.utils import free_port

MODEL_NAME = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("flags, message", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
    (["--random-range-ratio", "1"], "--random-range-ratio must be in [0, 1), got 1.0"),
    (["--dataset-name", "sharegpt"], "--dataset-path is required with --dataset-name sharegpt"),
    (["--dataset-name", "custom", "--dataset-path", "/no/such/file.jsonl"], "--dataset-path /no/such/file.jsonl: file not found"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--burstiness", "-1"], "--burstiness must be > 0"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--hourly-cost", "0"], "--hourly-cost must be > 0"),
    (["--metric-percentiles", "50,101"], "--metric-percentiles must be in (0, 100]"),
    (["--percentile-metrics", "ttft,foo"], "--percentile-metrics: unknown metric 'foo'"),
    (["--goodput", "ttft=5"], "--goodput: 'ttft=5' is not METRIC:MS"),
    (["--sweep", "load:1,2"], "--sweep: 'load:1,2' is not concurrency:N,N,... or rate:R,R,..."),
    (["--sweep", "concurrency:1.5"], "--sweep: 'concurrency:1.5': concurrency levels must be whole numbers"),
    (["--slo", "ttft_p95:5"], "--slo needs --sweep"),
    (["--sweep", "rate:1", "--slo", "ttft_q95:5"], "--slo: 'ttft_q95:5' is not METRIC_STAT:MS"),
    (["--sweep", "concurrency:1,2", "--max-concurrency", "4"], "drop --max-concurrency"),
    (["--sweep", "rate:1,2", "--request-rate", "4"], "drop --request-rate"),
])
def test_bench_serve_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--model", MODEL_NAME, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, flags, message", [
    ("throughput", ["--num-prompts", "0"], "--num-prompts must be >= 1"),
    ("throughput", ["--hourly-cost", "-1"], "--hourly-cost must be > 0"),
    ("latency", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("latency", ["--num-iters", "0"], "--num-iters must be >= 1"),
])
def test_offline_flag_errors(command, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", command, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unreachable_server_fails_fast_with_the_reason(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "serve", "--base-url", url, "--model", MODEL_NAME, "--num-prompts", "1"]) == 1
    err = capsys.readouterr().err
    assert f"the test request to {url}/v1/completions failed: ConnectError" in err


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(5, float("inf"), 1.0, seed=0) == [0.0] * 5


def test_constant_rate_is_evenly_spaced():
    assert arrival_times(4, 4.0, float("inf"), seed=0) == pytest.approx([0.0, 0.25, 0.5, 0.75])


@pytest.mark.parametrize("burstiness", [1.0, 4.0, 0.5])
def test_gamma_arrivals_have_the_asked_rate_and_spread(burstiness):
    times = arrival_times(20001, 10.0, burstiness, seed=3)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    # A gamma with shape k has coefficient of variation 1/sqrt(k): 1 for Poisson arrivals.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert arrival_times(50, 10.0, burstiness, seed=3) == times[:50]


@pytest.mark.parametrize("flags, message", [
    (["--backend", "openai", "--endpoint", "/v1/chat/completions"],
     "--backend openai sends a completions body, but --endpoint /v1/chat/completions is a chat endpoint"),
    (["--backend", "tgi"], "argument --backend: invalid choice"),
    (["--header", "x-tenant"], "--header: 'x-tenant' is not KEY=VALUE"),
    (["--extra-body", "[1]"], "--extra-body: expected a JSON object"),
    (["--extra-body", "{bad"], "--extra-body: not JSON"),
    (["--num-warmups", "-1"], "--num-warmups must be >= 0"),
    (["--random-prefix-len", "-1"], "--random-prefix-len must be >= 0"),
])
def test_vllm_flag_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--model", MODEL_NAME, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
