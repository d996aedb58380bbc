"""`--data-parallel-size 2` against 1 on this machine: W2 serving (random 256 in / 128 out) at
max concurrency 8, one server after the other, through `compare_vllm.py`'s server and bench
helpers, so the figures line up with its W2 table.

    .venv/bin/python benchmarks/data_parallel.py                   # DP 1 then DP 2, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/data_parallel.py --sizes 1,2 --num-prompts 32

With DP 2 on 2 CPUs each engine core runs on one CPU with one thread, so this measures what
replicas cost or gain against one engine using both CPUs for every step, not a speed-up from
more hardware.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from compare_vllm import MODEL_FOLDER, REPO, bench_serve, ensure_model, make_engines, running_server

from sluice.platform import cache_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,2", help="comma-separated data-parallel sizes, run in this order")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--port", type=int, default=8810)
    args = p.parse_args()
    model_dir = ensure_model(Path(cache_dir("hf", MODEL_FOLDER)))
    out_dir = REPO / "benchmarks" / "results" / f"data-parallel-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        (engine,) = make_engines(["sluice"], Path(), ["--data-parallel-size", str(size)])
        with running_server(engine, model_dir, args.port, out_dir) as server:
            bench_serve(server, model_dir, out_dir, "warmup", [
                "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "32",
                "--num-prompts", "8", "--max-concurrency", "8", "--seed", "1000"])
            result = bench_serve(server, model_dir, out_dir, f"w2-c{args.concurrency}-dp{size}", [
                "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
                "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency), "--seed", "8"])
        rows.append((size, result))
    base = rows[0][1]["output_throughput"]
    print(f"\nW2 at concurrency {args.concurrency}, {args.num_prompts} prompts (results in {out_dir})")
    print("| data_parallel_size | output tok/s | vs first | TTFT p50 ms | ITL p50 ms |")
    print("|---:|---:|---:|---:|---:|")
    for size, r in rows:
        print(f"| {size} | {r['output_throughput']:.1f} | {r['output_throughput'] / base:.2f} | "
              f"{r['median_ttft_ms']:.0f} | {r['median_itl_ms']:.1f} |")


if __name__ == "__main__":
    main()
