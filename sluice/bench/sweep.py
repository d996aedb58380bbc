"""Sweeps: run the same workload at several loads and find the highest one that still meets
latency targets (GuideLLM's sweep idea: set P95/P99 TTFT and ITL targets first, then find where
they break).

    --sweep concurrency:1,2,4,8       fixed concurrency levels (requests sent as fast as slots free)
    --sweep rate:1,2,4                request rates (req/s), arrivals per --burstiness
    --slo ttft_p95:500 itl_p99:50     targets: METRIC_STAT:MS, METRIC in ttft|tpot|itl|e2el,
                                      STAT pNN (a percentile), mean or median

A level meets the targets when none of its requests failed and every target holds. The chosen
level is the last one before the first level that misses: a level that passes above a failing one
is noise, not capacity.
"""

from __future__ import annotations

import math
import re

from sluice.bench.metrics import METRICS, parse_targets, percentile_key

SWEEP_MODES = ("concurrency", "rate")
_SLO_RE = re.compile(rf"^({'|'.join(METRICS)})_(mean|median|p\d+(?:\.\d+)?)$")


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """'concurrency:1,2,4' -> ('concurrency', [1, 2, 4]); levels ascending, distinct, > 0."""
    mode, sep, values = spec.partition(":")
    if not sep or mode not in SWEEP_MODES:
        raise ValueError(f"'{spec}' is not concurrency:N,N,... or rate:R,R,...")
    try:
        levels = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"'{spec}': levels must be numbers separated by commas") from None
    if not levels or any(not level > 0 for level in levels):
        raise ValueError(f"'{spec}': give at least one level, every level > 0")
    if mode == "concurrency" and any(not level.is_integer() for level in levels):
        raise ValueError(f"'{spec}': concurrency levels must be whole numbers")
    if len(set(levels)) != len(levels):
        raise ValueError(f"'{spec}': levels must be distinct")
    return mode, sorted(int(v) if mode == "concurrency" else v for v in levels)


def parse_slos(items: list[str]) -> dict[str, float]:
    """['ttft_p95:500', 'itl_p99:50'] -> {'ttft_p95': 500.0, 'itl_p99': 50.0}."""
    form = (f"METRIC_STAT:MS (e.g. ttft_p95:500) with METRIC one of {', '.join(METRICS)} "
            "and STAT pNN, mean or median")
    slos = parse_targets(items, lambda name: bool(_SLO_RE.match(name)), form)
    for name in slos:
        stat = name.split("_", 1)[1]
        if stat.startswith("p") and not 0 <= float(stat[1:]) <= 100:
            raise ValueError(f"'{name}': the percentile must be in [0, 100]")
    return slos


def slo_percentiles(slos: dict[str, float]) -> list[float]:
    """The percentiles the targets need computed."""
    return [float(name.split("_p", 1)[1]) for name in slos if "_p" in name]


def summary_key(slo: str) -> str:
    """'ttft_p95' -> 'p95_ttft_ms', the summary field the target is checked against."""
    metric, stat = slo.split("_", 1)
    if stat.startswith("p"):
        stat = percentile_key(float(stat[1:]))
    return f"{stat}_{metric}_ms"


def meets_slos(summary: dict, slos: dict[str, float]) -> bool:
    """No failed request, and every target met (a metric with no samples cannot meet one)."""
    if summary["failed"] or not summary["completed"]:
        return False
    for slo, limit in slos.items():
        value = summary.get(summary_key(slo))
        if value is None or value > limit:
            return False
    return True


def choose_level(levels: list[dict], slos: dict[str, float]) -> dict | None:
    """The highest level meeting every target with every lower level meeting them too; None if the
    lowest level already misses. `levels` are per-level summaries with a 'level' field."""
    chosen = None
    for summary in sorted(levels, key=lambda s: s["level"]):
        if not meets_slos(summary, slos):
            break
        chosen = summary
    return chosen


def format_level(mode: str, level: float) -> str:
    return f"{level:g}" if mode == "rate" else str(int(level))


def sweep_table(mode: str, levels: list[dict], slos: dict[str, float]) -> str:
    """One line per level: throughput, TTFT and ITL percentiles (ms), failures, and the verdict."""
    with_cost = any(s.get("cost_per_million_output_tokens") is not None for s in levels)
    head = (f"{mode:>11} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'p95':>7} {'p99':>7} "
            f"{'ITL p50':>8} {'p95':>7} {'p99':>7} {'failed':>6} {'meets SLO':>9}")
    if with_cost:
        head += f" {'$/1M out':>9}"
    lines = [head, "-" * len(head)]
    for s in sorted(levels, key=lambda s: s["level"]):
        cells = [f"{format_level(mode, s['level']):>11}", f"{s['request_throughput']:7.2f}",
                 f"{s['output_throughput']:9.1f}"]
        cells += [_ms(s.get(f"{p}_ttft_ms"), 9 if p == "p50" else 7) for p in ("p50", "p95", "p99")]
        cells += [_ms(s.get(f"{p}_itl_ms"), 8 if p == "p50" else 7) for p in ("p50", "p95", "p99")]
        cells += [f"{s['failed']:6d}", f"{('yes' if meets_slos(s, slos) else 'no') if slos else '-':>9}"]
        if with_cost:
            cost = s.get("cost_per_million_output_tokens")
            cells.append(f"{cost:9.3f}" if cost is not None else f"{'-':>9}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _ms(value: float | None, width: int) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def verdict(mode: str, levels: list[dict], slos: dict[str, float]) -> str:
    """The sentence naming the chosen level, and any higher level that met the targets only after a
    lower one missed (a sign of noise: more prompts per level would tell)."""
    if not slos:
        return "No --slo targets given: every level is listed, none chosen."
    targets = ", ".join(f"{name} <= {limit:g} ms" for name, limit in slos.items())
    chosen = choose_level(levels, slos)
    top = chosen["level"] if chosen else -math.inf
    stray = [format_level(mode, s["level"]) for s in sorted(levels, key=lambda s: s["level"])
             if s["level"] > top and meets_slos(s, slos)]
    note = (f"; {mode} {', '.join(stray)} met them too, above a level that missed: "
            "rerun with more prompts per level to tell noise from capacity") if stray else ""
    if chosen is None:
        return f"No {mode} level meets {targets} (the lowest level already misses){note}."
    return (f"Highest {mode} meeting {targets}: {format_level(mode, chosen['level'])} "
            f"({chosen['request_throughput']:.2f} req/s, {chosen['output_throughput']:.1f} output tok/s){note}")
