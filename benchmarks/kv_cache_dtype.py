"""KV cache dtypes of the default model side by side, in one run: auto (bf16) vs fp8 vs int8.

    .venv/bin/python benchmarks/kv_cache_dtype.py                  # ~1 minute on 2 cores
    .venv/bin/python benchmarks/kv_cache_dtype.py --input-len 2048 --output-len 128

Per dtype: KV bytes per token (every layer's K and V, scales included, as the engine sizes its
blocks), the blocks a fixed --kv-cache-memory-bytes budget holds, and single-stream ITL at a long
context (one request of --input-len prompt tokens, --output-len out; ITL = (whole - prefill) /
(output - 1), best of 3), where attention reads the most cache per step.
"""

from __future__ import annotations

import argparse
import gc
import json

from sluice.bench.offline import time_batch, time_generate
from sluice.bench.datasets import random_token_ids

DTYPES = ("auto", "fp8", "int8")


def run_dtype(kv_cache_dtype: str, args: argparse.Namespace) -> dict:
    from sluice import LLM

    llm = LLM(kv_cache_dtype=kv_cache_dtype, dtype="bfloat16", enable_prefix_caching=False,
              max_model_len=args.input_len + args.output_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    core = llm.engine_core
    time_generate(llm, random_token_ids(llm.get_tokenizer(), 2, args.input_len, 99), [8] * 2, use_tqdm=False)
    prefills, wholes = zip(*(time_batch(llm, 1, args.input_len, args.output_len, 11 + 2 * i) for i in range(3)))
    result = {"kv_cache_dtype": kv_cache_dtype,
              "kv_bytes_per_token": core.executor.describe()["bytes_per_block"] // core.config.cache.block_size,
              "num_blocks": core.kv.pool.num_usable_blocks,
              "itl_ms": (min(wholes) - min(prefills)) / (args.output_len - 1) * 1e3}
    del llm, core
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens of the single-stream request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens of the single-stream request")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20, help="the same KV budget for each dtype")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {', '.join(DTYPES)}")
    args = p.parse_args()
    results = [run_dtype(d, args) for d in args.dtypes.split(",")]
    base = results[0]
    print(f"{'kv_cache_dtype':>14} {'KV B/token':>10} {'vs first':>8} {'blocks':>7} {'ITL ms':>7} {'vs first':>8}")
    for r in results:
        print(f"{r['kv_cache_dtype']:>14} {r['kv_bytes_per_token']:>10} "
              f"{r['kv_bytes_per_token'] / base['kv_bytes_per_token']:>8.3f} {r['num_blocks']:>7} "
              f"{r['itl_ms']:>7.2f} {r['itl_ms'] / base['itl_ms']:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
