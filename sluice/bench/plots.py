"""PNG plots of a benchmark. Figures are built with matplotlib's Figure directly (no pyplot), so
nothing needs a display and no global backend setting changes.

- latency_cdf.png: cumulative distributions of TTFT, TPOT, ITL and E2EL, one line per run;
- sweep_throughput.png: request and output-token throughput against load;
- sweep_latency.png: p95 (solid) and p99 (dashed) TTFT and ITL against load, with the targets;
- engine_timeline.png (with --save-trace): the server's KV pool, queues and each step's batch over time.
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


def engine_timeline(trace: list[dict], directory: str) -> str:
    """Three panels on one time axis (seconds from the trace's start): KV blocks in use and cached,
    running and waiting requests with preemptions marked, and each step's decode and prefill tokens
    against the step's token budget."""
    fig = Figure(figsize=(11, 8))
    pool, queues, batch = fig.subplots(3, 1, sharex=True)
    if trace:
        t0 = trace[0]["t"]
        t = [s["t"] - t0 for s in trace]
        pool.plot(t, [s["in_use"] for s in trace], label="in use")
        pool.plot(t, [s["cached"] for s in trace], label="cached, reusable")
        pool.axhline(trace[0]["num_blocks"], color="grey", linestyle=":", label="usable blocks")
        queues.step(t, [s["running"] for s in trace], where="post", label="running")
        queues.step(t, [s["waiting"] for s in trace], where="post", label="waiting")
        preempted = [x for x, s in zip(t, trace) if s["preemptions"]]
        if preempted:
            queues.plot(preempted, [0] * len(preempted), "rx", label="preemption")
        steps = [step for s in trace for step in s["steps"]]
        x = [step[1] - t0 for step in steps]
        decode = np.array([step[2] for step in steps])
        prefill = np.array([step[3] for step in steps])
        batch.vlines(x, 0, decode, color="tab:blue", label="decode tokens")
        batch.vlines(x, decode, decode + prefill, color="tab:purple", label="prefill tokens")
        batch.axhline(trace[0]["budget"], color="grey", linestyle=":", label="token budget")
    for ax, title, unit in ((pool, "KV block pool", "blocks"), (queues, "Queues", "requests"),
                            (batch, "Each step's batch", "tokens")):
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    batch.set_xlabel("seconds")
    return _save(fig, directory, "engine_timeline.png")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(fig, directory: str, name: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
