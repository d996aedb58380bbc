"""Engine statistics without a model: the scheduler's records, the Prometheus logger, the log
line, and a request span over OTLP/gRPC (the default protocol) to a receiver in this test."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sluice.config import EngineConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.engine.messages import EngineCoreRequest
from sluice.metrics.loggers import LoggingStatLogger
from sluice.metrics.prometheus import PrometheusStatLogger, buckets_1_2_5
from sluice.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
from sluice.sampling_params import SamplingParams

from tests.utils import fake_runner_output

BS = 4


def run(config: EngineConfig, prompts: list[list[int]], max_tokens: int, num_blocks: int = 64):
    """Drive a model-free scheduler to the end, recording every step like the engine core."""
    kv = KVCacheManager(num_blocks, BS, True, config.observability.kv_cache_metrics)
    scheduler = Scheduler(config.scheduler, kv, 1024)
    metrics = PrometheusStatLogger(config, 1024, kv.pool.num_usable_blocks, "none")
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        scheduler.add_request(Request(EngineCoreRequest(f"r{i}", prompt, params, eos_token_ids=()), max_tokens))
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        scheduler.update_from_output(out, fake_runner_output(scheduler, out))
        metrics.record(scheduler.scheduler_stats(), scheduler.take_stats())
    return metrics


def samples(metrics: PrometheusStatLogger) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name + (f"{{{s.labels['finished_reason']}}}" if "finished_reason" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if "le" not in s.labels}


def test_counters_and_histograms_match_the_workload():
    shared = list(range(100, 108))  # two full blocks both prompts share
    metrics = run(EngineConfig.from_kwargs(kv_cache_metrics=True), [shared + [1, 2, 3], shared + [4, 5]], max_tokens=5)
    s = samples(metrics)
    assert s["vllm:prompt_tokens_total"] == 11 + 10
    assert s["vllm:generation_tokens_total"] == 10
    assert s["vllm:request_success_total{length}"] == 2 and s["vllm:request_success_total{stop}"] == 0
    assert s["vllm:prefix_cache_queries_total"] == 21
    # Blocks are indexed as they are allocated, so the second prompt hits the first's in the same step.
    assert s["vllm:prefix_cache_hits_total"] == 8
    assert s["vllm:time_to_first_token_seconds_count"] == 2
    assert s["vllm:inter_token_latency_seconds_count"] == 2 * 4
    assert s["vllm:request_generation_tokens_sum"] == 10
    assert s["vllm:iteration_tokens_total_sum"] == (21 - 8) + 2 * 4  # prompt tokens not hit, fed-back tokens
    assert s["vllm:num_requests_running"] == s["vllm:num_requests_waiting"] == 0
    assert s["vllm:prompt_tokens_cached_total"] == 8
    assert s["vllm:request_max_num_generation_tokens_sum"] == 10
    assert s["vllm:request_num_preemptions_count"] == 2 and s["vllm:request_num_preemptions_sum"] == 0
    assert metrics.values()["sluice:num_free_blocks"] == 63


def test_engine_metrics_carry_the_engine_label_and_n_children_count_once():
    """vLLM's `engine` label on every engine metric; the longest of n sequences is one observation."""
    metrics = PrometheusStatLogger(EngineConfig.from_kwargs(), 1024, 64, "none")
    it = IterationStats()
    for index, tokens in enumerate((3, 9, 5)):
        it.finished.append(FinishedRequestStats(f"cmpl-x-{index}", "length", 4, tokens, 9, 3, 0.0, 0.0, 0.0, 0.0, 1.0))
    metrics.record(SchedulerStats(), it)
    families = list(text_string_to_metric_families(metrics.render().decode()))
    for family in families:
        for sample in family.samples:
            assert sample.labels["engine"] == "0", sample
    s = samples(metrics)
    assert s["vllm:request_max_num_generation_tokens_count"] == 1
    assert s["vllm:request_max_num_generation_tokens_sum"] == 9


def test_a_later_request_hits_the_prefix_and_reuses_its_blocks():
    config = EngineConfig.from_kwargs(kv_cache_metrics=True)
    kv = KVCacheManager(64, BS, True, track_block_times=True)
    scheduler = Scheduler(config.scheduler, kv, 1024)
    for i, prompt in enumerate([list(range(100, 110)), list(range(100, 111))]):
        request = Request(EngineCoreRequest(f"r{i}", prompt, SamplingParams(max_tokens=1), eos_token_ids=()), 1)
        scheduler.add_request(request)
        while scheduler.has_unfinished():
            out = scheduler.schedule()
            scheduler.update_from_output(out, fake_runner_output(scheduler, out))
    stats = scheduler.take_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (21, 8)
    assert len(stats.kv_blocks.reuse_gaps) == 2 and all(gap >= 0 for gap in stats.kv_blocks.reuse_gaps)
    assert [f.finish_reason for f in stats.finished] == ["length", "length"]


def test_evicted_cached_blocks_report_lifetime_and_idle_time():
    metrics = run(EngineConfig.from_kwargs(kv_cache_metrics=True),
                  [list(range(100 * i, 100 * i + 12)) for i in range(1, 6)], max_tokens=1, num_blocks=8)
    s = samples(metrics)
    assert s["vllm:kv_block_lifetime_seconds_count"] == s["vllm:kv_block_idle_before_evict_seconds_count"] > 0


def test_token_buckets_follow_1_2_5_up_to_the_limit():
    assert buckets_1_2_5(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert buckets_1_2_5(4) == [1, 2]


def test_periodic_log_line_reports_throughput_and_queue(caplog):
    logger = LoggingStatLogger(interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="sluice"):
        logger.record(SchedulerStats(num_running=3, num_waiting_capacity=2, kv_cache_usage=0.5),
                      IterationStats(num_generation_tokens=30, prefix_cache_queries=10, prefix_cache_hits=4))
    line = caplog.records[-1].getMessage()
    assert "running 3, waiting 2, KV cache 50.0%" in line and "prefix cache hit rate 40.0%" in line


def test_detailed_traces_need_an_endpoint_and_a_known_module():
    with pytest.raises(ValueError, match="collect_detailed_traces needs otlp_traces_endpoint"):
        EngineConfig.from_kwargs(collect_detailed_traces="all")
    with pytest.raises(ValueError, match="collect_detailed_traces must be one of"):
        EngineConfig.from_kwargs(collect_detailed_traces="gpu", otlp_traces_endpoint="http://x")


def test_an_unknown_otlp_protocol_names_the_variable(monkeypatch):
    from sluice.metrics.tracing import span_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        span_exporter("http://127.0.0.1:1")


def test_request_span_reaches_a_grpc_collector(monkeypatch):
    from sluice.metrics.tracing import RequestTracer
    from tests.otlp_receiver import GrpcReceiver, span_attributes

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    receiver = GrpcReceiver()
    try:
        tracer = RequestTracer(EngineConfig.from_kwargs(otlp_traces_endpoint=receiver.endpoint,
                                                        served_model_name="m"))
        now = time.time()
        finished = FinishedRequestStats(
            request_id="req-1", finish_reason="stop", num_prompt_tokens=12, num_generation_tokens=3,
            max_tokens=16, n=1, arrival_time=now - 1.0, queued_time=now - 0.9, scheduled_time=now - 0.8,
            first_token_time=now - 0.5, finished_time=now,
        )
        tracer.record(SchedulerStats(), IterationStats(finished=[finished]))
        assert tracer.provider.force_flush(10_000)
        [span] = receiver.wait_for(lambda spans: spans.named("llm_request"))
        attrs = span_attributes(span)
        assert attrs["gen_ai.request.id"] == "req-1" and attrs["gen_ai.response.model"] == "m"
        assert attrs["gen_ai.usage.completion_tokens"] == 3 and attrs["gen_ai.response.finish_reasons"] == ["stop"]
        assert attrs["gen_ai.latency.time_to_first_token"] == pytest.approx(0.5, abs=1e-6)
        assert attrs["gen_ai.latency.time_in_queue"] == pytest.approx(0.1, abs=1e-6)
        assert attrs["gen_ai.latency.e2e"] == pytest.approx(1.0, abs=1e-6)
        tracer.provider.shutdown()
    finally:
        receiver.close()
