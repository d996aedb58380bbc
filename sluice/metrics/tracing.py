"""OpenTelemetry traces: one span per request, and per-step spans on request.

The engine core emits them, since it holds every timestamp of a request's life; a span joins
the client's trace when the HTTP request carried W3C trace context (`traceparent`). Export is
OTLP over gRPC, or HTTP/protobuf when OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf; the
standard OTEL_* variables (batch delay, headers, service name) apply as usual.
"""

from __future__ import annotations

import os

from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, set_span_in_context

from sluice.config import EngineConfig
from sluice.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"


def span_exporter(endpoint: str):
    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"{PROTOCOL_ENV} must be 'grpc' or 'http/protobuf', got {protocol!r}")
    return OTLPSpanExporter(endpoint=endpoint)


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


class RequestTracer:
    def __init__(self, config: EngineConfig) -> None:
        obs = config.observability
        self.model_name = config.model_name
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "sluice")})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(span_exporter(obs.otlp_traces_endpoint)))
        self.tracer = self.provider.get_tracer("sluice")
        self.detailed = obs.collect_detailed_traces is not None

    def record(self, scheduler: SchedulerStats, it: IterationStats) -> None:
        for request in it.finished:
            self.request_span(request)

    def request_span(self, r: FinishedRequestStats) -> None:
        attributes = {
            "gen_ai.request.id": r.request_id,
            "gen_ai.response.model": self.model_name,
            "gen_ai.request.max_tokens": r.max_tokens,
            "gen_ai.request.n": r.n,
            "gen_ai.request.temperature": r.temperature,
            "gen_ai.request.top_p": r.top_p,
            "gen_ai.usage.prompt_tokens": r.num_prompt_tokens,
            "gen_ai.usage.completion_tokens": r.num_generation_tokens,
            "gen_ai.usage.num_cached_tokens": r.num_cached_tokens,
            "gen_ai.response.finish_reasons": [r.finish_reason],
            "gen_ai.latency.time_in_queue": r.queue_time,
            "gen_ai.latency.time_in_model_prefill": r.prefill_time,
            "gen_ai.latency.time_in_model_decode": r.decode_time,
            "gen_ai.latency.time_in_model_inference": r.inference_time,
            "gen_ai.latency.e2e": r.e2e_latency,
            "sluice.num_preemptions": r.num_preemptions,
        }
        if r.first_token_time is not None:
            attributes["gen_ai.latency.time_to_first_token"] = r.first_token_time - r.arrival_time
        span = self.tracer.start_span(
            "llm_request", context=extract(r.trace_headers or {}), kind=SpanKind.SERVER,
            attributes=attributes, start_time=ns(r.arrival_time),
        )
        span.end(end_time=ns(r.finished_time))

    def step_span(self, times: tuple[float, float, float, float], request_ids: list[str], num_tokens: int) -> None:
        """One engine step (--collect-detailed-traces): schedule, execute_model, update children."""
        start, scheduled, executed, end = times
        step = self.tracer.start_span("engine_step", start_time=ns(start), attributes={
            "sluice.step.num_requests": len(request_ids),
            "sluice.step.num_tokens": num_tokens,
            "sluice.step.request_ids": request_ids,
        })
        parent = set_span_in_context(step)
        for name, begin, finish in (("schedule", start, scheduled), ("execute_model", scheduled, executed),
                                    ("update", executed, end)):
            self.tracer.start_span(name, context=parent, start_time=ns(begin)).end(end_time=ns(finish))
        step.end(end_time=ns(end))
