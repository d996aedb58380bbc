"""What an open /dashboard costs the engine: its mean step time with and without a page connected.

    python benchmarks/dashboard_overhead.py                 # default model, 5 rounds of each
    python benchmarks/dashboard_overhead.py --rounds 9 --concurrency 8

One `sluice serve`; each round runs the same `sluice bench serve` load (random 256 in / 128 out,
--ignore-eos) twice, once plain and once with a dashboard client reading /dashboard/events for the
whole run, in alternating order so drift hits both alike. The client is a process of its own, as a
browser would be (a reader thread inside the load generator would slow the load generator, not the
engine). The engine's mean step time is the run's duration over the steps it took
(vllm:iteration_tokens_total's count); the goal is within 3% (ratio <= 1.03). It also prints the
CPU seconds the API process and the engine core used per run, the cost a ratio on a busy machine
cannot resolve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.server.utils

from sluice.entrypoints.cli import main as sluice_main  # noqa: E402
from tests.server.utils import RemoteServer  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
# A page's part: read every state event and parse it, as the page's JavaScript does.
READER = """
import json, sys, httpx
n = 0
with httpx.stream("GET", sys.argv[1], timeout=None) as response:
    for line in response.iter_lines():
        if line.startswith("data: ") and json.loads(line[6:]) is not None:
            n += 1
"""


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run(server: RemoteServer, folder: str, args: argparse.Namespace, seed: int, dashboard: bool) -> dict:
    """One load run: the engine's mean step time, output tok/s and the server processes' CPU seconds."""
    name = f"run-{seed}-{int(dashboard)}.json"
    flags = ["bench", "serve", "--base-url", server.url, "--model", MODEL, "--dataset-name", "random",
             "--random-input-len", "256", "--random-output-len", "128", "--ignore-eos",
             "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
             "--seed", str(seed), "--disable-tqdm", "--save-result", "--result-dir", folder, "--result-filename", name]
    reader = subprocess.Popen([sys.executable, "-c", READER, server.url + "/dashboard/events"]) if dashboard else None
    api, core = psutil.Process(server.process.pid), server.core_process()
    steps, cpu = server.metrics()["vllm:iteration_tokens_total_count"], (cpu_seconds(api), cpu_seconds(core))
    try:
        if sluice_main(flags) != 0:
            raise SystemExit("sluice bench serve failed")
    finally:
        if reader is not None:
            reader.kill()
    steps = server.metrics()["vllm:iteration_tokens_total_count"] - steps
    with open(os.path.join(folder, name)) as f:
        result = json.load(f)
    return {"step_ms": 1000 * result["duration"] / steps, "tok_s": result["output_throughput"],
            "api_cpu": cpu_seconds(api) - cpu[0], "core_cpu": cpu_seconds(core) - cpu[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=32)
    args = parser.parse_args()
    server = RemoteServer()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    try:
        with tempfile.TemporaryDirectory() as folder:
            run(server, folder, args, 999, False)  # warm-up
            for i in range(args.rounds):
                for dashboard in ((False, True) if i % 2 == 0 else (True, False)):
                    r = run(server, folder, args, i, dashboard)
                    runs[dashboard].append(r)
                    print(f"round {i}: {'dashboard' if dashboard else 'plain    '} step {r['step_ms']:6.2f} ms, "
                          f"{r['tok_s']:7.1f} output tok/s, CPU s: API {r['api_cpu']:.2f}, core {r['core_cpu']:.2f}",
                          flush=True)
    finally:
        server.stop()
    plain, watched = runs[False], runs[True]
    ratios = [w["step_ms"] / p["step_ms"] for w, p in zip(watched, plain)]
    for key, label in (("step_ms", "step ms"), ("tok_s", "output tok/s"), ("api_cpu", "API CPU s"),
                       ("core_cpu", "core CPU s")):
        print(f"median {label:12}: plain {statistics.median(r[key] for r in plain):8.2f}, "
              f"with dashboard {statistics.median(r[key] for r in watched):8.2f}")
    print(f"median step time ratio (dashboard / plain, per round): {statistics.median(ratios):.3f} (goal <= 1.03)")


if __name__ == "__main__":
    main()
