"""What an open /dashboard costs the engine: W2-style output tok/s with and without a page connected.

    python benchmarks/dashboard_overhead.py                 # default model, 5 rounds of each
    python benchmarks/dashboard_overhead.py --rounds 9 --concurrency 8

One `sluice serve`; each round runs the same `sluice bench serve` load (random 256 in / 128 out,
--ignore-eos) twice, once plain and once with a dashboard client reading /dashboard/events for the
whole run (`--save-trace`, the stream a browser reads), in alternating order so drift hits both
alike. It prints each run and the median ratio; the goal is within 3% (ratio >= 0.97). Time it on
a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.server.utils

from sluice.entrypoints.cli import main as sluice_main  # noqa: E402
from tests.server.utils import RemoteServer  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"


def output_tok_s(url: str, folder: str, args: argparse.Namespace, seed: int, dashboard: bool) -> float:
    name = f"run-{seed}-{int(dashboard)}.json"
    flags = ["bench", "serve", "--base-url", url, "--model", MODEL, "--dataset-name", "random",
             "--random-input-len", "256", "--random-output-len", "128", "--ignore-eos",
             "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
             "--seed", str(seed), "--disable-tqdm", "--save-result", "--result-dir", folder, "--result-filename", name]
    if dashboard:
        flags += ["--save-trace", os.path.join(folder, f"trace-{seed}.jsonl")]
    if sluice_main(flags) != 0:
        raise SystemExit("sluice bench serve failed")
    with open(os.path.join(folder, name)) as f:
        return json.load(f)["output_throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=32)
    args = parser.parse_args()
    server = RemoteServer()
    try:
        with tempfile.TemporaryDirectory() as folder:
            output_tok_s(server.url, folder, args, 999, False)  # warm-up
            plain, watched = [], []
            for i in range(args.rounds):
                order = (False, True) if i % 2 == 0 else (True, False)
                for dashboard in order:
                    tok_s = output_tok_s(server.url, folder, args, i, dashboard)
                    (watched if dashboard else plain).append(tok_s)
                    print(f"round {i}: {'dashboard' if dashboard else 'plain    '} {tok_s:8.1f} output tok/s", flush=True)
    finally:
        server.stop()
    ratios = [w / p for w, p in zip(watched, plain)]
    print(f"\nmedian output tok/s: plain {statistics.median(plain):.1f}, with dashboard {statistics.median(watched):.1f}")
    print(f"median ratio (dashboard / plain, per round): {statistics.median(ratios):.3f} (goal >= 0.97)")


if __name__ == "__main__":
    main()
