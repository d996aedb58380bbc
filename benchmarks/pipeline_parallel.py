"""`--pipeline-parallel-size 2` with micro-batches (the engine core keeps one batch per stage in
flight, each batch half the requests) against the same engine taking one batch at a time (what
PP=2 did before: stage 0 idles while stage 1 runs, and the other way round). Output tokens per
second at concurrency --concurrency, one engine switched between the two modes round by round,
and how often the stages overlapped: the share of steps that stage 0 started before stage 1 had
ended the step before (from the workers' own step times).

    .venv/bin/python benchmarks/pipeline_parallel.py                # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/pipeline_parallel.py --model FOLDER --dtype float32

The default model is tensor_parallel.py's random model of SmolLM2-135M's shapes (30 layers: 15 a
stage). On 2 CPUs each stage has one CPU: the point is that both work at once, not a speed-up from
more hardware; a decode step of a small batch costs about what a larger one does (the weights are
read either way), so halving the batch gains less than the overlap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tensor_parallel import smollm2_shaped_model  # noqa: E402

from sluice import LLM, SamplingParams  # noqa: E402
from sluice.bench.datasets import random_token_ids  # noqa: E402
from sluice.platform import cpu_model  # noqa: E402


def use_micro_batches(llm: LLM, on: bool) -> None:
    """The engine core's batch queue (one batch per stage) and the scheduler's per-batch share,
    or the plain loop: one batch of every request, through all stages, at a time."""
    core = llm.engine_core
    core.batch_queue = deque() if on else None
    core.scheduler.num_micro_batches = core.max_concurrent_batches if on else 1


def overlap_share(llm: LLM) -> float:
    """Share of steps stage 0 started before the last stage ended the step sent before it."""
    times = llm.engine_core.executor.collective_rpc("step_times")
    first, last = times[0], times[-1]
    pairs = len(first) - 1
    return sum(first[k + 1][0] < last[k][1] for k in range(pairs)) / max(pairs, 1)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """(output tokens per second, overlap share) of one batch of prompts."""
    llm.engine_core.executor.collective_rpc("step_times")  # forget earlier steps
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, overlap_share(llm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (default: see above)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of each mode's")
    args = p.parse_args()
    model = args.model or smollm2_shaped_model()
    llm = LLM(model, dtype=args.dtype, max_model_len=1024, kv_cache_memory_bytes=256 << 20,
              enable_prefix_caching=False, pipeline_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    modes = {"micro-batches": True, "one batch at a time": False}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    overlaps: dict[str, list[float]] = {m: [] for m in modes}
    run(llm, random_token_ids(tokenizer, args.concurrency, args.input_len, seed=1), params)  # warm-up
    for round_ in range(args.rounds):
        for mode, on in modes.items():
            use_micro_batches(llm, on)
            prompts = random_token_ids(tokenizer, args.concurrency, args.input_len, seed=100 * round_ + on)
            rate, overlap = run(llm, prompts, params)
            rates[mode].append(rate)
            overlaps[mode].append(overlap)
    base = statistics.median(rates["one batch at a time"])
    print(f"\npipeline_parallel_size=2, c={args.concurrency}, {args.input_len} prompt tokens, {args.output_len} "
          f"generated, dtype {args.dtype}, model {model}; CPU {cpu_model()} ({len(os.sched_getaffinity(0))} CPUs); "
          f"median of {args.rounds} interleaved rounds")
    print("| mode | output tok/s | vs one batch at a time | steps overlapped |")
    print("|---|---:|---:|---:|")
    for mode in modes:
        rate = statistics.median(rates[mode])
        print(f"| {mode} | {rate:.1f} | {rate / base:.2f}x | {statistics.median(overlaps[mode]):.0%} |")
    llm.engine_core.shutdown()


if __name__ == "__main__":
    main()
