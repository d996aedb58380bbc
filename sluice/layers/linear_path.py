"""Which path each linear layer takes: the packed native kernel (gemm.c) or F.linear (oneDNN).

Neither wins everywhere. On an AMD EPYC (Zen 4: AVX-512 BF16, no AMX) the packed kernel measured
1.0-3x faster than oneDNN at every row count from 1 to 256 on SmolLM2's shapes; on Intel Xeons
with AMX, oneDNN is about 4x faster than the kernel's dot-product loops above a few rows. So the
choice is measured, once per CPU: at first start each distinct layer shape runs on both paths
at decode-sized and prefill-sized row counts, and the winner is kept on disk
(platform.cache_dir("linear-paths")) under a key naming the CPU model, its flags and the thread
count. SLUICE_LINEAR_PATH=native|torch forces one path everywhere (to compare them).

A layer keeps one weight form: both would cost a second copy of every weight. The path chosen
is the one with the smaller sum of slowdowns against the faster path at each row count, so a
path that loses badly at one count (oneDNN at batch 1, the kernel at 256 rows under AMX) is not
chosen for a small win at another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sluice.layers import native
from sluice.platform import Platform, cache_dir, current_platform

logger = logging.getLogger(__name__)

PATHS = ("native", "torch")
ROW_COUNTS = (1, 16, 256)  # single-stream decode, batched decode, a prompt chunk
REPEATS = 5


def choose_path(module) -> str:
    """"native" or "torch" for this Linear (its weight still in place, unpacked)."""
    weight = module.weight
    platform = current_platform(weight.device)
    if not platform.native_kernels(weight.dtype):
        return "torch"
    forced = os.environ.get("SLUICE_LINEAR_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"SLUICE_LINEAR_PATH must be one of {', '.join(PATHS)}; got {forced!r}")
        return forced
    key = (f"{type(module).__name__} {module.out_features}x{module.in_features} bias={module.bias is not None} "
           f"{weight.dtype} threads={torch.get_num_threads()}")
    return measured_once(platform, key, lambda: _measure(module), PATHS)


def measured_once(platform: Platform, key: str, measure: Callable[[], tuple[str, str]],
                  allowed: tuple[str, ...]) -> str:
    """A choice timed once per CPU and kept on disk: `measure` returns (the winner, its timings
    for the log). Later starts read it back, so one machine always makes the same choice."""
    choices = _choices(platform)
    if choices.get(key) not in allowed:
        choices[key], timings = measure()
        logger.info("measured once for this CPU, %s: %s (%s)", key, choices[key], timings)
        _save(platform, choices)
    return choices[key]


def prompt_dtype(model_config, hidden: int, inner: int) -> torch.dtype:
    """The dtype of what only ever runs whole prompts (an encoder, a vision tower), whose speed is
    matmul throughput: under --dtype auto on a CPU, the faster one here. Where bf16 dot products
    are no faster than float32 FMAs (AVX512-BF16 without AMX, as on Intel Xeons before Sapphire
    Rapids' AMX) float32 wins, and it is exact; so one matmul of the FFN's shape is timed in each
    dtype, once per CPU. Otherwise the model's dtype."""
    dtype = model_config.torch_dtype
    if model_config.dtype != "auto" or dtype != torch.bfloat16 or torch.device(model_config.device).type != "cpu":
        return dtype
    shape = (512, hidden, inner)
    key = "encoder dtype for a {}x{}x{} matmul".format(*shape)
    chosen = measured_once(current_platform("cpu"), key, lambda: _time_dtypes(*shape), ("float32", "bfloat16"))
    return getattr(torch, chosen)


def _time_dtypes(rows: int, hidden: int, inner: int) -> tuple[str, str]:
    """The faster dtype for one FFN-shaped matmul on one thread (CPU time, which other processes
    on the cores can't skew), with the packed bf16 kernel where pack_linears may pick it."""
    weight = torch.randn(inner, hidden) * 0.02
    x = torch.randn(rows, hidden)
    runs = {"float32": [lambda: F.linear(x, weight)]}
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    runs["bfloat16"] = [lambda: F.linear(x16, weight16)]
    packed = native.pack_linear(weight16) if current_platform("cpu").native_kernels(torch.bfloat16) else None
    if packed is not None:
        runs["bfloat16"].append(lambda: native.linear(x16, packed, inner))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {dtype: min(_best_cpu_seconds(run) for run in choices) for dtype, choices in runs.items()}
    finally:
        torch.set_num_threads(threads)
    return min(best, key=best.__getitem__), ", ".join(f"{d} {t * 1e3:.2f} ms" for d, t in best.items())


def _best_cpu_seconds(run, repeats: int = REPEATS) -> float:
    """The least CPU time of the calling thread over a few runs, after a warm-up."""
    run()
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        run()
        times.append(time.thread_time() - started)
    return min(times)


def _measure(module) -> tuple[str, str]:
    """Time the layer's own call on both paths; the winner and the timings, for the log."""
    if not module.pack(drop_weight=False):
        return "torch", "the kernel can't take this shape"
    try:
        times = {path: [] for path in PATHS}
        with torch.inference_mode():
            for rows in ROW_COUNTS:
                x = torch.randn(rows, module.in_features, dtype=module.weight.dtype)
                best = _time_both(module, x)
                for path in PATHS:
                    times[path].append(best[path])
    finally:
        module.unpack()
    slowdown = {path: sum(t / min(pair) for t, pair in zip(times[path], zip(*times.values()))) for path in PATHS}
    winner = min(PATHS, key=slowdown.__getitem__)
    per_rows = ", ".join(f"{a * 1e3:.3f}/{b * 1e3:.3f}" for a, b in zip(times["native"], times["torch"]))
    return winner, f"ms at {ROW_COUNTS} rows, native/torch: {per_rows}"


def _time_both(module, x: torch.Tensor) -> dict[str, float]:
    """Min of interleaved repeats of each path (the machine may be shared)."""
    packed, packed_bias = module.packed, module.packed_bias
    best = {path: float("inf") for path in PATHS}
    for i in range(REPEATS + 1):
        for path in PATHS:
            module.packed, module.packed_bias = (packed, packed_bias) if path == "native" else (None, None)
            start = time.perf_counter()
            module.run(x)
            elapsed = time.perf_counter() - start
            if i:  # the first round warms up
                best[path] = min(best[path], elapsed)
    module.packed, module.packed_bias = packed, packed_bias
    return best


def _path_file(platform: Platform) -> Path:
    key = hashlib.sha256(platform.cpu_key.encode()).hexdigest()[:16]
    return Path(cache_dir("linear-paths", f"{key}.json"))


@functools.lru_cache(maxsize=None)
def _choices(platform: Platform) -> dict[str, str]:
    try:
        stored = json.loads(_path_file(platform).read_text())
    except (OSError, ValueError):
        return {}
    if stored.get("cpu") != platform.cpu_key:
        return {}
    return {key: choice for key, choice in stored.get("choices", {}).items() if isinstance(choice, str)}


def _save(platform: Platform, choices: dict[str, str]) -> None:
    target = _path_file(platform)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
            json.dump({"cpu": platform.cpu_key, "choices": choices}, f, indent=1, sort_keys=True)
        os.replace(f.name, target)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:
        logger.warning("could not store linear-path timings in %s: %s", target, exc)
