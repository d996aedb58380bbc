"""The quantized matmul kernels alone against sluice's bf16 kernel, at the default model's shapes.

    .venv/bin/python benchmarks/quant_kernels.py                  # decode (1 row) and prefill (256 rows)
    .venv/bin/python benchmarks/quant_kernels.py --rows 1 --threads 2

Per layer shape of SmolLM2-135M (q/k/v, o, gate/up, down in Q4_1; the tied lm_head in Q8_0) and
per row count: gemm.c's packed bf16 kernel, quant.c's kernel on the blocks as stored (from 16
rows: the blocks dequantized into bf16 panels per call, as the layer runs them) and on the blocks
repacked at load (16 rows interleaved), the three interleaved, best of --repeats. With
--threads 1 (the default) each is timed in the calling thread's CPU time, which load from other
processes on a shared machine changes far less than wall time; with more threads, wall time.
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np
import torch

from sluice.layers import native
from sluice.quantization.gguf import Q, gguf_linear, gguf_linear_many_rows, kernel_available, repack

SHAPES = [("qkv_proj", 960, 576, Q.Q4_1), ("o_proj", 576, 576, Q.Q4_1), ("gate_up_proj", 3072, 576, Q.Q4_1),
          ("down_proj", 576, 1536, Q.Q4_1), ("lm_head", 49152, 576, Q.Q8_0)]


def time_calls(fns: dict, clock, repeats: int, calls: int) -> dict[str, float]:
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            start = clock()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (clock() - start) / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not kernel_available() or native.load_library() is None:
        raise SystemExit("needs the native kernels and AVX-512 VNNI")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"{args.threads} thread(s), {'thread CPU' if args.threads == 1 else 'wall'} time; ratios against bf16")
    print(f"{'layer':>13} {'rows':>5} {'type':>5} {'bf16 us':>9} {'stored us':>10} {'repacked us':>12} "
          f"{'stored':>7} {'repacked':>9}")
    rng = np.random.default_rng(0)
    for name, n, k, qtype in SHAPES:
        weight = rng.normal(0, 0.05, (n, k)).astype(np.float32)
        blocks = torch.from_numpy(gguf.quants.quantize(weight, qtype))
        packed, dense = repack(blocks, qtype), native.pack_linear(torch.from_numpy(weight).to(torch.bfloat16))
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            stored = (lambda: gguf_linear(x, blocks, qtype, n)) if rows < 16 else \
                (lambda: gguf_linear_many_rows(x, blocks, qtype, n, None))
            fns = {"bf16": lambda: native.linear(x, dense, n), "stored": stored,
                   "repacked": lambda: gguf_linear(x, packed, qtype, n)}
            best = time_calls(fns, clock, args.repeats, max(2, int(2e7 / (n * k * rows))))
            print(f"{name:>13} {rows:>5} {qtype.name:>5} {best['bf16'] * 1e6:>9.1f} {best['stored'] * 1e6:>10.1f} "
                  f"{best['repacked'] * 1e6:>12.1f} {best['stored'] / best['bf16']:>6.2f}x "
                  f"{best['repacked'] / best['bf16']:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
