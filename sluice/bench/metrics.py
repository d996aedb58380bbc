"""Per-request records -> one summary, with `vllm bench serve`'s definitions and key names, so that
numbers from sluice and from vLLM's tool can be set side by side.

- TTFT: first content chunk's arrival minus send time;
- ITL: gaps between successive content chunks (pooled over all requests);
- TPOT: (e2e - TTFT) / (output tokens - 1), one value per request with more than one token;
- E2EL: send to the end of the stream;
- output tokens: the server's `usage` count when it sends one (as `vllm bench serve` counts
  them), else the returned text re-tokenized; the re-tokenized count is kept beside it;
- goodput: completed requests per second that met every given target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from sluice.bench.client import RequestRecord

METRICS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)


def count_output_tokens(records: Iterable[RequestRecord], tokenizer) -> None:
    """Fill each record's output counts: re-tokenized from the text the server returned, and the
    headline one, which is the server's usage when it sent one."""
    for record in records:
        record.output_tokens_retokenized = len(tokenizer.encode(record.text, add_special_tokens=False)) if record.text else 0
        usage = record.usage_output_tokens
        record.output_tokens = usage if usage is not None else record.output_tokens_retokenized


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's spelling)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def request_metrics(record: RequestRecord) -> dict[str, float | None]:
    """One request's TTFT, TPOT, mean ITL and E2EL in ms (None where undefined)."""
    ttft = record.ttft_s * 1000 if record.ttft_s is not None else None
    tpot = None
    if record.ttft_s is not None and record.output_tokens > 1:
        tpot = (record.e2el_s - record.ttft_s) * 1000 / (record.output_tokens - 1)
    gaps = record.itl_s
    return {"ttft": ttft, "tpot": tpot, "itl": float(np.mean(gaps)) * 1000 if gaps else None,
            "e2el": record.e2el_s * 1000}


def metric_values(records: Iterable[RequestRecord]) -> dict[str, list[float]]:
    """Every sample of each metric in ms over successful requests; ITL pools all gaps."""
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for record in records:
        if not record.success:
            continue
        per_request = request_metrics(record)
        for name in ("ttft", "tpot", "e2el"):
            if per_request[name] is not None:
                values[name].append(per_request[name])
        values["itl"].extend(gap * 1000 for gap in record.itl_s)
    return values


def distribution(values: list[float], percentiles: Iterable[float]) -> dict[str, float | None]:
    """mean, median, std and the asked percentiles (numpy's linear interpolation, as vLLM); None when empty."""
    percentiles = list(percentiles)
    if not values:
        return {"mean": None, "median": None, "std": None, **{percentile_key(p): None for p in percentiles}}
    array = np.asarray(values, dtype=np.float64)
    result = {"mean": float(array.mean()), "median": float(np.median(array)), "std": float(array.std())}
    for p in percentiles:
        result[percentile_key(p)] = float(np.percentile(array, p))
    return result


def max_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once, from each request's send and end times."""
    events = []
    for record in records:
        events.append((record.start_s, 1))
        events.append((record.start_s + record.e2el_s, -1))
    peak = current = 0
    for _, step in sorted(events):  # at a tie an end (-1) sorts before a start: back-to-back is not overlap
        current += step
        peak = max(peak, current)
    return peak


def meets_goodput(record: RequestRecord, targets: dict[str, float]) -> bool:
    """A successful request whose every targeted metric (ms) is within its target; the ITL target
    applies to the request's mean gap (GuideLLM's per-request ITL)."""
    if not record.success:
        return False
    values = request_metrics(record)
    return all(values[name] is None or values[name] <= limit for name, limit in targets.items())


def cost_per_million_tokens(hourly_cost: float, tokens_per_s: float) -> float | None:
    """The guide's formula: hourly cost / (tokens per second * 3600) * 1e6."""
    return hourly_cost / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else None


def summarize(records: list[RequestRecord], duration: float, percentiles: Iterable[float] = DEFAULT_PERCENTILES,
              goodput: dict[str, float] | None = None, hourly_cost: float | None = None) -> dict:
    """The run's headline numbers under vLLM's key names (times in ms, rates per second)."""
    done = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    usage_in = [r.usage_prompt_tokens for r in done]
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
    rate = (lambda count: count / duration) if duration > 0 else (lambda count: 0.0)
    summary = {
        "num_prompts": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(Counter(r.error for r in records if not r.success)),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_input_tokens_usage": sum(usage_in) if done and None not in usage_in else None,
        "total_output_tokens": output_tokens,
        "total_output_tokens_retokenized": sum(r.output_tokens_retokenized for r in done),
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": rate(len(done)),
        "request_goodput": rate(sum(meets_goodput(r, goodput) for r in done)) if goodput else None,
        "goodput_targets_ms": goodput or None,
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(input_tokens + output_tokens),
        "max_concurrent_requests": max_concurrency(records),
    }
    for name, values in metric_values(records).items():
        for stat, value in distribution(values, percentiles).items():
            summary[f"{stat}_{name}_ms"] = value
    if hourly_cost is not None:
        summary["hourly_cost"] = hourly_cost
        summary["cost_per_million_output_tokens"] = cost_per_million_tokens(hourly_cost, summary["output_throughput"])
    return summary


def parse_targets(items: list[str], is_name: Callable[[str], bool], form: str) -> dict[str, float]:
    """['NAME:MS', ...] -> {NAME: MS}; ValueError names the bad item and the expected `form`."""
    targets = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not is_name(name):
            raise ValueError(f"'{item}' is not {form}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"'{item}': '{value}' is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"'{item}': the target must be > 0 ms")
        targets[name] = ms
    return targets


def parse_goodput(items: list[str]) -> dict[str, float]:
    """['ttft:200', 'itl:50'] -> {'ttft': 200.0, 'itl': 50.0}."""
    return parse_targets(items, METRICS.__contains__, f"METRIC:MS with METRIC one of {', '.join(METRICS)}")
