"""`sluice bench serve|throughput|latency`: the subcommands, their flags and their checks."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

from sluice.bench import offline, serve


def add_bench_parser(subparsers) -> None:
    """Register `bench` and its three subcommands on the `sluice` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks: serving load, offline throughput, latency",
                                  description="Benchmarks; flag names follow `vllm bench`.")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    _add(commands, "serve", serve.add_serve_args, serve.check_serve_args, serve.run_bench_serve,
         help="load an OpenAI-compatible server (sluice, vLLM, llama.cpp) and measure it",
         description="Stream requests to an OpenAI-compatible server and report TTFT, TPOT, ITL, E2EL "
                     "percentiles, throughput, goodput and cost; --sweep finds the highest load meeting --slo targets.")
    _add(commands, "throughput", offline.add_throughput_args, offline.check_throughput_args,
         offline.run_bench_throughput, help="offline throughput of the engine in this process",
         description="Generate a dataset in one batch in-process; print requests/s and tokens/s.")
    _add(commands, "latency", offline.add_latency_args, offline.check_latency_args, offline.run_bench_latency,
         help="single-batch latency: prefill ms and per-token decode ms",
         description="Time one batch in-process: prefill, decode per token, end to end.")


def _add(commands, name: str, add_args: Callable, check: Callable, run: Callable[[argparse.Namespace], int],
         **texts: str) -> None:
    parser = commands.add_parser(name, **texts)
    add_args(parser)
    parser.set_defaults(func=functools.partial(_checked_run, parser, check, run))


def _checked_run(parser: argparse.ArgumentParser, check: Callable, run: Callable[[argparse.Namespace], int],
                 args: argparse.Namespace) -> int:
    """Flags are checked at the edge (errors name the flag and the limit), then the command runs."""
    check(parser, args)
    return run(args)
