"""/metrics tells the truth, traces reach an OTLP collector, and the Grafana dashboard's queries
name only metrics that exist.

One server with a tiny KV cache (so preemptions and evictions happen), two API processes (so the
HTTP metrics go through multiprocess collection), KV block metrics, and detailed traces sent to an
OTLP HTTP receiver inside this test. Counts are checked exactly, as deltas over a known workload.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import httpx
import pytest

from sluice.config import SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.engine.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams
from tests.otlp_receiver import HttpReceiver, span_attributes
from tests.server.utils import RemoteServer, parse_samples

from tests.utils import fake_runner_output

MODEL = "observed-model"
NUM_BLOCKS = 20  # 19 usable blocks of 16 tokens: four children of one 60-token prompt growing to 124 cannot all fit
BLOCK_SIZE = 16
MAX_MODEL_LEN = 256
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "sluice-dashboard.json"


@pytest.fixture(scope="module")
def receiver():
    r = HttpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def observed(receiver):
    srv = RemoteServer(
        "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE), "--kv-cache-metrics",
        "--api-server-count", "2",
        "--otlp-traces-endpoint", receiver.endpoint, "--collect-detailed-traces", "all",
        env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    yield srv
    srv.stop()


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def complete(server: RemoteServer, prompt, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}
    with server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def labelled(server: RemoteServer, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(v for n, l, v in parse_samples(text) if n == name and all(l.get(k) == w for k, w in labels.items()))


def test_every_metric_carries_vllm_names_and_the_model_label(observed):
    text = httpx.get(observed.url + "/metrics", timeout=30).text
    names = {name for name, _, _ in parse_samples(text)}
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_waiting_by_reason",
        "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket", "vllm:request_prefill_time_seconds_bucket",
        "vllm:request_decode_time_seconds_bucket", "vllm:request_prompt_tokens_bucket",
        "vllm:request_generation_tokens_bucket", "vllm:iteration_tokens_total_bucket",
        "vllm:kv_block_lifetime_seconds_bucket", "vllm:kv_block_idle_before_evict_seconds_bucket",
        "vllm:kv_block_reuse_gap_seconds_bucket", "vllm:prompt_tokens_cached_total",
        "vllm:request_max_num_generation_tokens_bucket", "vllm:request_num_preemptions_bucket",
        "sluice:num_free_blocks", "sluice:num_total_blocks", "sluice:num_waiting_tokens", "http_requests_total",
    ):
        assert name in names, name
    assert not {"vllm:num_free_blocks", "vllm:num_total_blocks", "vllm:num_waiting_tokens"} & names
    for name, labels, _ in parse_samples(text):
        if name.startswith(("vllm:", "sluice:")):
            assert labels["model_name"] == MODEL and labels["engine"] == "0", (name, labels)
    reasons = {l["reason"] for n, l, _ in parse_samples(text) if n == "vllm:num_requests_waiting_by_reason"}
    assert reasons == {"capacity", "deferred"}
    finish = {l["finished_reason"] for n, l, _ in parse_samples(text) if n == "vllm:request_success_total"}
    assert {"stop", "length", "abort"} <= finish


def test_counts_are_exact_for_a_known_workload(observed):
    prompts = [random_ids(n, seed) for n, seed in ((40, 1), (50, 2), (60, 3))]
    before = observed.metrics()
    successes_before = labelled(observed, "vllm:request_success_total", finished_reason="length")
    usages = [complete(observed, prompt, max_tokens=8)["usage"] for prompt in prompts]
    after = observed.metrics()

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert prompt_tokens == 150 and sum(u["completion_tokens"] for u in usages) == 24
    assert delta(before, after, "vllm:prompt_tokens_total") == prompt_tokens
    assert delta(before, after, "vllm:generation_tokens_total") == 24
    assert labelled(observed, "vllm:request_success_total", finished_reason="length") - successes_before == 3
    assert delta(before, after, "vllm:prefix_cache_queries_total") == prompt_tokens
    assert delta(before, after, "vllm:prefix_cache_hits_total") == 0  # unrelated random prompts
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert delta(before, after, f"vllm:{name}_count") == 3, name
    assert delta(before, after, "vllm:inter_token_latency_seconds_count") == 3 * 7
    assert delta(before, after, "vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta(before, after, "vllm:request_generation_tokens_sum") == 24
    assert delta(before, after, "vllm:request_max_num_generation_tokens_sum") == 24
    assert delta(before, after, "vllm:request_num_preemptions_count") == 3
    # Every prompt token is computed once, and every generated token but the last is fed back.
    assert delta(before, after, "vllm:iteration_tokens_total_sum") == prompt_tokens + 3 * 7
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0


def test_a_repeated_prefix_is_counted_as_hits(observed):
    prefix = random_ids(4 * BLOCK_SIZE, seed=4)
    first, second = prefix + random_ids(10, seed=5), prefix + random_ids(12, seed=6)
    complete(observed, first, max_tokens=2)
    before = observed.metrics()
    complete(observed, second, max_tokens=2)
    after = observed.metrics()
    assert delta(before, after, "vllm:prefix_cache_queries_total") == len(second)
    assert delta(before, after, "vllm:prefix_cache_hits_total") == len(prefix)
    assert delta(before, after, "vllm:prompt_tokens_cached_total") == len(prefix)
    # Each block found in the cache is one reuse of that block.
    assert delta(before, after, "vllm:kv_block_reuse_gap_seconds_count") == len(prefix) // BLOCK_SIZE


def expected_preemptions(prompt: list[int], n: int, max_tokens: int) -> int:
    """The same children on the same scheduler and cache, without a model: how often it preempts."""
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, True), MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        scheduler.add_request(Request(EngineCoreRequest(f"r-{i}", list(prompt), params, eos_token_ids=()), max_tokens))
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        scheduler.update_from_output(out, fake_runner_output(scheduler, out))
    return scheduler.stats.num_preemptions


def test_preemptions_with_a_tiny_cache_are_counted_exactly(observed):
    prompt, n, max_tokens = random_ids(60, seed=7), 4, 64
    expected = expected_preemptions(prompt, n, max_tokens)
    assert expected > 0
    before = observed.metrics()
    result = complete(observed, prompt, max_tokens=max_tokens, n=n)  # n children arrive together
    after = observed.metrics()
    assert [c["finish_reason"] for c in result["choices"]] == ["length"] * n
    assert delta(before, after, "vllm:num_preemptions_total") == expected
    assert delta(before, after, "vllm:generation_tokens_total") == n * max_tokens
    assert delta(before, after, "vllm:e2e_request_latency_seconds_count") == n
    assert delta(before, after, "vllm:request_num_preemptions_sum") == expected
    # One user request of n sequences: one observation, its longest sequence.
    assert delta(before, after, "vllm:request_max_num_generation_tokens_count") == 1
    assert delta(before, after, "vllm:request_max_num_generation_tokens_sum") == max_tokens
    # Recomputed tokens show up as extra work per step, never as extra prompt tokens.
    assert delta(before, after, "vllm:prompt_tokens_total") == n * len(prompt)
    evictions = delta(before, after, "vllm:kv_block_lifetime_seconds_count")
    assert evictions == delta(before, after, "vllm:kv_block_idle_before_evict_seconds_count")


def test_http_metrics_add_up_across_api_processes(observed):
    handler = {"handler": "/v1/models", "status": "200", "method": "GET"}
    before = labelled(observed, "http_requests_total", **handler)
    for _ in range(6):
        assert httpx.get(observed.url + "/v1/models", timeout=30).status_code == 200  # a new connection each
    assert labelled(observed, "http_requests_total", **handler) - before == 6


def test_each_request_exports_a_span_with_its_timings(observed, receiver):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    body = {"model": MODEL, "prompt": random_ids(30, seed=8), "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with observed.http() as http:
        response = http.post("/v1/completions", json=body, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    result = response.json()

    def request_span(spans):
        return next((s for s in spans.named("llm_request")
                     if span_attributes(s)["gen_ai.request.id"] == result["id"]), None)

    span = receiver.wait_for(request_span)
    attrs = span_attributes(span)
    assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
    assert attrs["gen_ai.response.model"] == MODEL
    assert attrs["gen_ai.usage.prompt_tokens"] == result["usage"]["prompt_tokens"] == 30
    assert attrs["gen_ai.usage.completion_tokens"] == result["usage"]["completion_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["gen_ai.request.max_tokens"] == 5
    assert 0 <= attrs["gen_ai.latency.time_in_queue"] <= attrs["gen_ai.latency.time_to_first_token"]
    assert attrs["gen_ai.latency.time_to_first_token"] <= attrs["gen_ai.latency.e2e"]
    assert abs((span.end_time_unix_nano - span.start_time_unix_nano) / 1e9 - attrs["gen_ai.latency.e2e"]) < 1e-3

    # --collect-detailed-traces: a span per engine step, with its three phases as children.
    steps = receiver.wait_for(lambda spans: [s for s in spans.named("engine_step")
                                             if result["id"] in span_attributes(s)["sluice.step.request_ids"]])
    assert len(steps) == 5  # one prefill step and four decode steps
    step_ids = {s.span_id for s in steps}
    phases = [s for name in ("schedule", "execute_model", "update") for s in receiver.named(name)
              if s.parent_span_id in step_ids]
    assert len(phases) == 3 * len(steps)


def test_dashboard_queries_use_only_live_metric_names(observed):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"(vllm:[a-z0-9_:]+)", expr)}
    live = {name for name, _, _ in parse_samples(httpx.get(observed.url + "/metrics", timeout=30).text)}
    assert used and used <= live, used - live
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Throughput", "Latency percentiles", "KV cache pressure", "Queue depth"]
    metrics_scrape = (DASHBOARD.parents[1] / "prometheus" / "prometheus.yml").read_text()
    assert "/metrics" in metrics_scrape
