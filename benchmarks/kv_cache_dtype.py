"""KV cache dtypes of the default model side by side, in one run: auto (bf16) vs fp8 vs int8.

    .venv/bin/python benchmarks/kv_cache_dtype.py                  # ~1 minute on 2 cores
    .venv/bin/python benchmarks/kv_cache_dtype.py --input-len 2048 --output-len 128
    .venv/bin/python benchmarks/kv_cache_dtype.py --kernel          # the attention kernel alone, seconds

Per dtype: KV bytes per token (every layer's K and V, scales included, as the engine sizes its
blocks), the blocks a fixed --kv-cache-memory-bytes budget holds, and single-stream ITL at a long
context (one request of --input-len prompt tokens, --output-len out; ITL = (whole - prefill) /
(output - 1), best of --rounds), where attention reads the most cache per step. All dtypes' engines
are loaded at once and their requests run in turns, so load on a shared machine hits them alike. --kernel times the native
attention kernel alone instead: one decode row over --input-len keys at SmolLM2's shapes (9 query
heads, 3 KV heads of 64, 30 layers), the dtypes' calls interleaved, best of 15.
"""

from __future__ import annotations

import argparse
import gc
import json

from sluice.bench.offline import time_batch, time_generate
from sluice.bench.datasets import random_token_ids

DTYPES = ("auto", "fp8", "int8")
LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16  # SmolLM2-135M


def kernel_times(dtypes: list[str], context: int) -> dict[str, float]:
    """Seconds per decode step (LAYERS calls) of the native attention kernel over `context` keys in
    blocks scattered through the pool, per KV cache dtype; the dtypes' calls interleaved."""
    import time

    import torch

    from sluice.layers import native
    from sluice.layers.attention.layer import BACKENDS
    from sluice.quantization.kv_cache import get_kv_cache_quant

    torch.manual_seed(0)
    blocks = -(-context // BLOCK)
    table = (torch.randperm(4 * blocks)[:blocks] + 1).view(1, -1)
    seq_lens, q = torch.tensor([context]), torch.randn(1, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    calls = {}
    for dtype in dtypes:
        quant = get_kv_cache_quant(dtype)
        shape = BACKENDS["native"](quant).kv_cache_shape(4 * blocks + 1, BLOCK, KV_HEADS, HEAD_DIM)
        if quant is None:
            cache = torch.randn(shape).to(torch.bfloat16)
            calls[dtype] = lambda c=cache: native.paged_attention(q, c[0], c[1], table, seq_lens, HEAD_DIM ** -0.5)
        else:  # bytes below 0x70: finite fp8 elements and bf16 scales
            cache = torch.randint(0, 0x70, shape, dtype=torch.uint8)
            calls[dtype] = lambda c=cache, k=quant.kernel_kind: native.paged_attention_kv8(
                q, c, k, table, seq_lens, HEAD_DIM ** -0.5)
    best = dict.fromkeys(dtypes, float("inf"))
    for _ in range(15):
        for dtype, call in calls.items():
            start = time.perf_counter()
            for _ in range(LAYERS):
                call()
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best


def load(kv_cache_dtype: str, args: argparse.Namespace):
    from sluice import LLM

    llm = LLM(kv_cache_dtype=kv_cache_dtype, dtype="bfloat16", enable_prefix_caching=False,
              max_model_len=args.input_len + args.output_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    time_generate(llm, random_token_ids(llm.get_tokenizer(), 2, args.input_len, 99), [8] * 2, use_tqdm=False)
    return llm


def run_dtypes(dtypes: list[str], args: argparse.Namespace) -> list[dict]:
    """Every dtype's engine loaded at once, then --rounds rounds of one request each, in turns (so a
    shared machine's load hits them alike); the best round's ITL."""
    llms = {dtype: load(dtype, args) for dtype in dtypes}
    runs = {dtype: [] for dtype in dtypes}
    for rnd in range(args.rounds):
        for dtype, llm in llms.items():
            runs[dtype].append(time_batch(llm, 1, args.input_len, args.output_len, 11 + 2 * rnd))
    results = []
    for dtype, llm in llms.items():
        core = llm.engine_core
        results.append({"kv_cache_dtype": dtype,
                        "kv_bytes_per_token": core.executor.describe()["bytes_per_block"] // core.config.cache.block_size,
                        "num_blocks": core.kv.pool.num_usable_blocks,
                        "itl_ms": min(whole - prefill for prefill, whole in runs[dtype]) / (args.output_len - 1) * 1e3})
    del llms
    gc.collect()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens of the single-stream request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens of the single-stream request")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20, help="the same KV budget for each dtype")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--rounds", type=int, default=3, help="single-stream rounds, the dtypes in turns in each")
    p.add_argument("--kernel", action="store_true", help="time the attention kernel alone (see above)")
    args = p.parse_args()
    if args.kernel:
        times = kernel_times(args.dtypes.split(","), args.input_len)
        first = next(iter(times.values()))
        for dtype, seconds in times.items():
            print(f"{dtype:>14} attention ms/step {seconds * 1e3:7.3f} {seconds / first:6.2f}x")
        return
    results = run_dtypes(args.dtypes.split(","), args)
    base = results[0]
    print(f"{'kv_cache_dtype':>14} {'KV B/token':>10} {'vs first':>8} {'blocks':>7} {'ITL ms':>7} {'vs first':>8}")
    for r in results:
        print(f"{r['kv_cache_dtype']:>14} {r['kv_bytes_per_token']:>10} "
              f"{r['kv_bytes_per_token'] / base['kv_bytes_per_token']:>8.3f} {r['num_blocks']:>7} "
              f"{r['itl_ms']:>7.2f} {r['itl_ms'] / base['itl_ms']:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
