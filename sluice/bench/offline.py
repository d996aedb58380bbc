"""`sluice bench throughput` and `sluice bench latency`: the engine in-process through `sluice.LLM`,
no HTTP in the way, so the numbers are the engine's own ceiling.

throughput: a dataset (default 128 random prompts, 256 tokens in, 128 out) generated in one
batch, every request making exactly its output length (ignore_eos, greedy).
latency: one batch of --batch-size prompts, timed twice per iteration on fresh prompts (so no
prefix-cache hit flatters it): with max_tokens=1 (prefill) and with --output-len tokens (the whole
request); per-token decode time = (whole - prefill) / (output_len - 1).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from sluice.bench import save_json
from sluice.bench.datasets import DatasetError, add_dataset_args, build_requests, check_dataset_args, random_token_ids
from sluice.bench.metrics import cost_per_million_tokens, distribution
from sluice.engine.arg_utils import add_engine_args, engine_kwargs


@dataclass(frozen=True)
class ThroughputResult:
    elapsed: float
    num_requests: int
    input_tokens: int
    output_tokens: int

    def to_json(self) -> dict:
        """vLLM's `bench throughput` keys, plus the output-only rate."""
        return {
            "elapsed_time": self.elapsed,
            "num_requests": self.num_requests,
            "total_num_tokens": self.input_tokens + self.output_tokens,
            "total_input_tokens": self.input_tokens,
            "total_output_tokens": self.output_tokens,
            "requests_per_second": self.num_requests / self.elapsed,
            "tokens_per_second": (self.input_tokens + self.output_tokens) / self.elapsed,
            "output_tokens_per_second": self.output_tokens / self.elapsed,
        }


# ---- flags -------------------------------------------------------------------------------------------
def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--output-json", default=None, metavar="PATH", help="write the results as JSON")


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    _add_engine_args(parser)
    add_dataset_args(parser)
    parser.set_defaults(num_prompts=128, random_input_len=256, random_output_len=128)
    parser.add_argument("--hourly-cost", type=float, default=None, metavar="USD",
                        help="infrastructure cost per hour: prints the cost per 1M output tokens")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    _add_engine_args(parser)
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens of each request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens of each request")
    parser.add_argument("--batch-size", type=int, default=8, help="requests in the batch")
    parser.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--num-iters", type=int, default=5, help="timed iterations")


def check_throughput_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problem = check_dataset_args(args)
    if problem:
        parser.error(problem)
    if args.hourly_cost is not None and not args.hourly_cost > 0:
        parser.error(f"--hourly-cost must be > 0, got {args.hourly_cost}")


def check_latency_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, low in (("input_len", 1), ("output_len", 1), ("batch_size", 1), ("num_iters_warmup", 0),
                      ("num_iters", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def make_llm(args: argparse.Namespace):
    from sluice import LLM

    try:
        return LLM(**engine_kwargs(args))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sluice bench: {e}") from None


# ---- timing ------------------------------------------------------------------------------------------------
def warm_up(llm) -> None:
    """One tiny request, so one-time costs (kernel compilation, first allocations) stay out of the timing."""
    from sluice import SamplingParams

    llm.generate([{"prompt_token_ids": [100] * 8}], SamplingParams(max_tokens=2), use_tqdm=False)


def time_generate(llm, prompts: list[list[int]], output_lens: list[int], use_tqdm: bool = True) -> ThroughputResult:
    """Generate every prompt (token ids) to exactly its output length, greedily, in one call."""
    from sluice import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return ThroughputResult(elapsed, len(prompts), sum(map(len, prompts)), output_tokens)


def report(label: str, result: ThroughputResult) -> float:
    """Print the labelled lines; return output tokens/s."""
    numbers = result.to_json()
    print(f"[{label}] {result.num_requests} requests, {result.input_tokens} prompt + {result.output_tokens} "
          f"output tokens, {result.elapsed:.2f} s")
    print(f"[{label}] requests/s:      {numbers['requests_per_second']:10.2f}")
    print(f"[{label}] total tokens/s:  {numbers['tokens_per_second']:10.2f}")
    print(f"[{label}] output tokens/s: {numbers['output_tokens_per_second']:10.2f}")
    return numbers["output_tokens_per_second"]


# ---- the commands ------------------------------------------------------------------------------------------
def run_bench_throughput(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    try:
        requests = build_requests(args, llm.get_tokenizer(), llm.config.model.seed)
    except DatasetError as e:
        raise SystemExit(f"sluice bench throughput: {e}") from None
    warm_up(llm)
    try:
        result = time_generate(llm, [r.prompt_ids for r in requests], [r.output_len for r in requests],
                               use_tqdm=not args.disable_tqdm)
    except ValueError as e:  # a prompt over the context limit, say
        raise SystemExit(f"sluice bench throughput: {e}") from None
    out_tps = report("sluice", result)
    numbers = {"model": llm.config.model.model, "dataset_name": args.dataset_name, **result.to_json()}
    if args.hourly_cost is not None:
        cost = cost_per_million_tokens(args.hourly_cost, out_tps)
        numbers.update(hourly_cost=args.hourly_cost, cost_per_million_output_tokens=cost)
        print(f"[sluice] cost per 1M output tokens at ${args.hourly_cost:g}/h: "
              f"${numbers['cost_per_million_output_tokens']:.4f}")
    if args.output_json:
        save_json(args.output_json, numbers)
    return 0


def time_batch(llm, batch: int, input_len: int, output_len: int, seed: int) -> tuple[float, float]:
    """(prefill s, whole-request s) for one batch, each on prompts no earlier run has cached."""
    tokenizer = llm.get_tokenizer()
    prefill = time_generate(llm, random_token_ids(tokenizer, batch, input_len, seed), [1] * batch, use_tqdm=False)
    whole = time_generate(llm, random_token_ids(tokenizer, batch, input_len, seed + 1), [output_len] * batch,
                          use_tqdm=False)
    return prefill.elapsed, whole.elapsed


def _latency_stats(values: list[float]) -> dict[str, float | None]:
    return distribution(values, (90, 99))


def run_bench_latency(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    warm_up(llm)
    timings = []
    for i in range(args.num_iters_warmup + args.num_iters):
        timing = time_batch(llm, args.batch_size, args.input_len, args.output_len, llm.config.model.seed + 2 * i)
        if i >= args.num_iters_warmup:
            timings.append(timing)
    prefill_ms = [p * 1000 for p, _ in timings]
    whole_ms = [w * 1000 for _, w in timings]
    decode_ms = [(w - p) * 1000 / (args.output_len - 1) for p, w in timings] if args.output_len > 1 else []
    rows = [("prefill (ms)", prefill_ms), ("decode per token (ms)", decode_ms), ("end to end (ms)", whole_ms)]
    print(f"batch {args.batch_size}, {args.input_len} tokens in, {args.output_len} out, {args.num_iters} iterations")
    print(f"{'':<24}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for label, values in rows:
        if values:
            stats = _latency_stats(values)
            print(f"{label:<24}" + "".join(f"{stats[k]:10.2f}" for k in ("mean", "median", "p90", "p99")))
    result = {
        "model": llm.config.model.model, "batch_size": args.batch_size, "input_len": args.input_len,
        "output_len": args.output_len, "num_iters": args.num_iters,
        "avg_latency": float(np.mean(whole_ms)) / 1000, "latencies": [w / 1000 for w in whole_ms],  # vLLM's keys (s)
        "prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms,
        "prefill_ms_stats": _latency_stats(prefill_ms), "end_to_end_ms_stats": _latency_stats(whole_ms),
        "decode_ms_per_token_stats": _latency_stats(decode_ms) if decode_ms else None,
    }
    if args.output_json:
        save_json(args.output_json, result)
    return 0
