"""PNG plots of a benchmark. Figures are built with matplotlib's Figure directly (no pyplot), so
nothing needs a display and no global backend setting changes.

- latency_cdf.png: cumulative distributions of TTFT, TPOT, ITL and E2EL, one line per run;
- sweep_throughput.png: request and output-token throughput against load;
- sweep_latency.png: p95 (solid) and p99 (dashed) TTFT and ITL against load, with the targets.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from sluice.bench.client import RequestRecord
from sluice.bench.metrics import METRICS, metric_values

_LOAD_LABELS = {"concurrency": "concurrency (requests in flight)", "rate": "request rate (req/s)"}


def latency_cdfs(runs: list[tuple[str, list[RequestRecord]]], directory: str) -> str:
    """One panel per metric; each run (a sweep level, or the single run) is one curve."""
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2)
    for ax, name in zip(axes.flat, METRICS):
        for label, records in runs:
            values = np.sort(metric_values(records)[name])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=label)
        ax.set_title(METRICS[name])
        ax.set_xlabel("ms (log scale)" if name == "itl" else "ms")
        if name == "itl":
            ax.set_xscale("log")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes.flat[0].legend(fontsize="small")
    return _save(fig, directory, "latency_cdf.png")


def sweep_plots(mode: str, levels: list[dict], slos: dict[str, float], directory: str) -> list[str]:
    levels = sorted(levels, key=lambda s: s["level"])
    x = [s["level"] for s in levels]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(x, [s["output_throughput"] for s in levels], "o-", label="output tok/s")
    ax.set_xlabel(_LOAD_LABELS[mode])
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, [s["request_throughput"] for s in levels], "s--", color="tab:orange", label="req/s")
    twin.set_ylabel("requests/s")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax.set_title("Throughput against load")
    paths = [_save(fig, directory, "sweep_throughput.png")]

    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("ttft", "itl")):
        for p, style in (("p95", "o-"), ("p99", "s--")):
            ax.plot(x, [_nan(s.get(f"{p}_{metric}_ms")) for s in levels], style, label=f"{metric.upper()} {p}")
        for slo, limit in slos.items():
            if slo.startswith(metric + "_"):
                ax.axhline(limit, color="red", linestyle=":", label=f"target {slo} {limit:g} ms")
        ax.set_xlabel(_LOAD_LABELS[mode])
        ax.set_ylabel("ms")
        ax.set_title(f"{METRICS[metric]} against load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    paths.append(_save(fig, directory, "sweep_latency.png"))
    return paths


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(fig, directory: str, name: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
