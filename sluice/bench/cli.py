"""`sluice bench serve|throughput|latency`: the subcommands, their flags and their checks."""

from __future__ import annotations

import argparse
import functools


def add_bench_parser(subparsers) -> None:
    """Register `bench` and its three subcommands on the `sluice` parser."""
    from sluice.bench.offline import add_latency_args, add_throughput_args
    from sluice.bench.serve import add_serve_args

    bench = subparsers.add_parser("bench", help="benchmarks: serving load, offline throughput, latency",
                                  description="Benchmarks; flag names follow `vllm bench`.")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    serve = commands.add_parser(
        "serve", help="load an OpenAI-compatible server (sluice, vLLM, llama.cpp) and measure it",
        description="Stream requests to an OpenAI-compatible server and report TTFT, TPOT, ITL, E2EL "
                    "percentiles, throughput, goodput and cost; --sweep finds the highest load meeting --slo targets.")
    add_serve_args(serve)
    serve.set_defaults(func=functools.partial(_run_serve, serve))
    throughput = commands.add_parser("throughput", help="offline throughput of the engine in this process",
                                     description="Generate a dataset in one batch in-process; "
                                                 "print requests/s and tokens/s.")
    add_throughput_args(throughput)
    throughput.set_defaults(func=functools.partial(_run_offline, throughput, "throughput"))
    latency = commands.add_parser("latency", help="single-batch latency: prefill ms and per-token decode ms",
                                  description="Time one batch in-process: prefill, decode per token, end to end.")
    add_latency_args(latency)
    latency.set_defaults(func=functools.partial(_run_offline, latency, "latency"))


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from sluice.bench.serve import check_serve_args, run_bench_serve

    check_serve_args(parser, args)
    return run_bench_serve(args)


def _run_offline(parser: argparse.ArgumentParser, which: str, args: argparse.Namespace) -> int:
    from sluice.bench.offline import check_offline_args, run_bench_latency, run_bench_throughput

    check_offline_args(parser, args)
    return run_bench_throughput(args) if which == "throughput" else run_bench_latency(args)
