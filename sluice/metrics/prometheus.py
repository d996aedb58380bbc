"""The engine's Prometheus metrics, under vLLM's names, so dashboards and alerts carry over.

Every engine metric carries vLLM's `engine` label (the data-parallel rank, "0" without DP) beside
`model_name`; the few gauges vLLM lacks use a `sluice:` prefix, so they never pose as vLLM's.
They live in the engine core, on a registry of their own: the core sees every request whichever
API process sent it, so the figures stay exact with `--api-server-count N`. API processes fetch
the rendered text and add their own HTTP metrics (see `metrics/http.py`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sluice.config import EngineConfig
from sluice.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

FINISH_REASONS = ("stop", "length", "abort", "error")
WAITING_REASONS = ("capacity", "deferred")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")

# Bucket boundaries as vLLM's, so percentiles from either engine compare.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
PREEMPTION_BUCKETS = [0, 1, 2, 5, 10, 20, 50, 100]
KV_BLOCK_BUCKETS = [0.001, 0.01, 0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0]


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: token-count buckets that fit the context length."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > limit:
                return out
            out.append(value)
        scale *= 10


class PrometheusStatLogger:
    def __init__(self, config: EngineConfig, max_model_len: int, num_blocks: int, quantization: str) -> None:
        """quantization: the weights' method in use (config's `auto` resolved at load)."""
        self.registry = CollectorRegistry()
        self.model_name = config.model_name
        labels = ["model_name", "engine"]
        m = (self.model_name, config.parallel.engine_index)  # every metric's own label values come after these

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels + list(extra), registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(*m)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.").labels(*m)
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.").labels(*m)
        by_reason = gauge("vllm:num_requests_waiting_by_reason",
                          "Waiting requests: capacity (no room yet) or deferred (waiting on a grammar).",
                          ("reason",))
        self.waiting_by_reason = {reason: by_reason.labels(*m, reason) for reason in WAITING_REASONS}
        self.waiting_tokens = gauge("sluice:num_waiting_tokens", "Prompt tokens the waiting queue still has to compute.").labels(*m)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV cache usage: 1 means every block is held.").labels(*m)
        self.free_blocks = gauge("sluice:num_free_blocks", "KV blocks no request holds (prefix-cached ones included).").labels(*m)
        self.total_blocks = gauge("sluice:num_total_blocks", "Usable KV blocks.").labels(*m)
        cache_info = gauge("vllm:cache_config_info", "KV cache configuration.",
                           ("block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"))
        cache_info.labels(*m, str(config.cache.block_size), str(num_blocks),
                          str(config.cache.enable_prefix_caching), config.cache.kv_cache_dtype).set(1)
        gauge("sluice:model_config_info", "Model configuration: the weight quantization in use.",
              ("quantization",)).labels(*m, quantization).set(1)
        self.lora_info = None
        if config.lora.enable_lora:  # vLLM's labels only; the value is when they last changed
            self.lora_info = Gauge("vllm:lora_requests_info", "Adapters of the running and waiting requests.",
                                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                                   registry=self.registry)
            self.lora_labels: tuple[str, ...] | None = None

        self.preemptions = counter("vllm:num_preemptions", "Preemptions (a request's KV freed; it recomputes).").labels(*m)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.").labels(*m)
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.").labels(*m)
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.").labels(*m)
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.").labels(*m)
        self.mm_queries = counter("vllm:mm_cache_queries", "Images looked up in the encoder cache.").labels(*m)
        self.mm_hits = counter("vllm:mm_cache_hits", "Images found in the encoder cache.").labels(*m)
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Prompt tokens of finished requests served from the prefix cache.").labels(*m)
        by_source = counter("vllm:prompt_tokens_by_source", "Prompt tokens of finished requests by where their KV "
                            "came from: local_compute, local_cache_hit, external_kv_transfer.", ("source",))
        self.prompt_tokens_by_source = {source: by_source.labels(*m, source) for source in PROMPT_TOKEN_SOURCES}
        success = counter("vllm:request_success", "Finished requests, by finish reason.", ("finished_reason",))
        self.success = {reason: success.labels(*m, reason) for reason in FINISH_REASONS}

        tokens = buckets_1_2_5(max_model_len)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Gap between consecutive tokens.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Waiting before first scheduled.", REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "First scheduled to first token.", REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "First token to finish.", REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds", "First scheduled to finish.", REQUEST_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds", "Decode time per output token after the first.", ITL_BUCKETS)
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Prompt tokens per request whose KV was computed here (not prefix-cached, not loaded from another "
            "engine).", tokens)
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.request_generation = histogram("vllm:request_generation_tokens", "Generated tokens per request.", tokens)
        self.request_max_tokens = histogram("vllm:request_params_max_tokens", "max_tokens per request.", tokens)
        self.request_max_generation = histogram("vllm:request_max_num_generation_tokens",
                                                "Most tokens generated by one of a request's n sequences.", tokens)
        self.request_preemptions = histogram("vllm:request_num_preemptions", "Preemptions per finished request.",
                                             PREEMPTION_BUCKETS)
        self.request_n = histogram("vllm:request_params_n", "n per request.", [1, 2, 5, 10, 20])
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Tokens computed per engine step.",
                                          buckets_1_2_5(max(config.scheduler.max_num_batched_tokens, 1)))
        self.spec_decoding = config.speculative.enabled
        if self.spec_decoding:
            self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Draft sequences verified.").labels(*m)
            self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.").labels(*m)
            self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.").labels(*m)
            per_pos = counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by position.",
                              ("position",))
            self.spec_accepted_per_pos = [per_pos.labels(*m, str(pos))
                                          for pos in range(config.speculative.num_speculative_tokens)]
        self.siblings: dict[str, tuple[int, int]] = {}  # parent id -> (children finished, most tokens)
        self.kv_block_metrics = config.observability.kv_cache_metrics
        if self.kv_block_metrics:
            self.block_lifetime = histogram("vllm:kv_block_lifetime_seconds",
                                            "A block's life from allocation to eviction of its cached content.",
                                            KV_BLOCK_BUCKETS)
            self.block_idle = histogram("vllm:kv_block_idle_before_evict_seconds",
                                        "Released until evicted.", KV_BLOCK_BUCKETS)
            self.block_reuse = histogram("vllm:kv_block_reuse_gap_seconds",
                                         "Between consecutive uses of a cached block.", KV_BLOCK_BUCKETS)

    def _record_lora(self, scheduler: SchedulerStats) -> None:
        labels = (str(scheduler.max_lora), ",".join(sorted(scheduler.waiting_lora_adapters)),
                  ",".join(sorted(scheduler.running_lora_adapters)))
        if labels == self.lora_labels:
            return
        if self.lora_labels is not None:
            self.lora_info.remove(*self.lora_labels)
        self.lora_info.labels(*labels).set_to_current_time()
        self.lora_labels = labels

    def record(self, scheduler: SchedulerStats, it: IterationStats) -> None:
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.waiting_by_reason["capacity"].set(scheduler.num_waiting_capacity)
        self.waiting_by_reason["deferred"].set(scheduler.num_waiting_deferred)
        self.waiting_tokens.set(scheduler.num_waiting_tokens)
        self.kv_usage.set(scheduler.kv_cache_usage)
        self.free_blocks.set(scheduler.num_free_blocks)
        self.total_blocks.set(scheduler.num_total_blocks)
        if self.lora_info is not None:
            self._record_lora(scheduler)

        self.preemptions.inc(it.num_preemptions)
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.generation_tokens.inc(it.num_generation_tokens)
        self.prefix_queries.inc(it.prefix_cache_queries)
        self.prefix_hits.inc(it.prefix_cache_hits)
        self.mm_queries.inc(it.mm_cache_queries)
        self.mm_hits.inc(it.mm_cache_hits)
        observe(self.iteration_tokens, it.step_num_tokens)
        if self.spec_decoding:
            self.spec_drafts.inc(it.spec.num_drafts)
            self.spec_draft_tokens.inc(it.spec.num_draft_tokens)
            self.spec_accepted.inc(it.spec.num_accepted_tokens)
            for pos, count in enumerate(it.spec.accepted_per_pos):
                self.spec_accepted_per_pos[pos].inc(count)
        observe(self.ttft, it.time_to_first_tokens)
        observe(self.itl, it.inter_token_latencies)
        for req in it.finished:
            self.success[req.finish_reason].inc()
            self.e2e.observe(req.e2e_latency)
            self.queue.observe(req.queue_time)
            self.prefill.observe(req.prefill_time)
            self.decode.observe(req.decode_time)
            self.inference.observe(req.inference_time)
            if req.time_per_output_token is not None:
                self.tpot.observe(req.time_per_output_token)
            self.request_prompt.observe(req.num_prompt_tokens)
            self.request_generation.observe(req.num_generation_tokens)
            self.request_max_tokens.observe(req.max_tokens)
            self.request_n.observe(req.n)
            self.request_preemptions.observe(req.num_preemptions)
            self.prompt_tokens_cached.inc(req.num_cached_tokens)
            if req.first_token_time is not None:  # its prefill ran
                self._record_prompt_sources(req)
            self.observe_max_generation(req)
        if self.kv_block_metrics:
            observe(self.block_lifetime, it.kv_blocks.lifetimes)
            observe(self.block_idle, it.kv_blocks.idle_before_evict)
            observe(self.block_reuse, it.kv_blocks.reuse_gaps)

    def _record_prompt_sources(self, req: FinishedRequestStats) -> None:
        computed = req.num_prompt_tokens - req.num_cached_tokens
        self.prefill_kv_computed.observe(computed)
        sources = self.prompt_tokens_by_source
        sources["local_compute"].inc(computed)
        sources["local_cache_hit"].inc(req.num_cached_tokens - req.num_external_tokens)
        sources["external_kv_transfer"].inc(req.num_external_tokens)

    def observe_max_generation(self, req: FinishedRequestStats) -> None:
        """The longest of a user request's n sequences, once its last one finishes (the core
        sees each of them as a request "<parent id>-<index>")."""
        if req.n == 1:
            self.request_max_generation.observe(req.num_generation_tokens)
            return
        parent = req.request_id.rsplit("-", 1)[0]
        done, longest = self.siblings.get(parent, (0, 0))
        done, longest = done + 1, max(longest, req.num_generation_tokens)
        if done < req.n:
            self.siblings[parent] = (done, longest)
        else:
            self.siblings.pop(parent, None)
            self.request_max_generation.observe(longest)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def values(self) -> dict[str, float]:
        """Counters and gauges as {family name: value}, labels summed (for tests and `LLM.get_metrics`)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge") or family.name.endswith("_info"):
                continue
            out[family.name] = sum(s.value for s in family.samples if not s.name.endswith("_created"))
        return out


def observe(histogram, values: list) -> None:
    for value in values:
        histogram.observe(value)
