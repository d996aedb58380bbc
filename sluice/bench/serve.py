"""`sluice bench serve`: load on any OpenAI-compatible server, then a summary, a sweep table,
a JSON file and plots. Flag names follow `vllm bench serve`.

Arrivals: every request at once behind a `--max-concurrency` limit (fixed concurrency), or at
`--request-rate` requests/s with gamma-distributed gaps (`--burstiness` 1 = Poisson, inf =
constant rate), or both; `--sweep` repeats the run over several concurrencies or rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from datetime import datetime

import httpx
import numpy as np
from tqdm.auto import tqdm

from sluice.bench import save_json
from sluice.bench.client import (
    BACKENDS, ENDPOINT_PATHS, Endpoint, RequestRecord, ServerTokenizer, request_headers, send_request,
)
from sluice.bench.datasets import BenchRequest, DatasetError, add_dataset_args, build_requests, check_dataset_args
from sluice.bench.metrics import (
    DEFAULT_PERCENTILES, METRICS, count_output_tokens, parse_goodput, percentile_key, summarize,
)
from sluice.bench.sweep import (
    choose_level, format_level, meets_slos, parse_slos, parse_sweep, slo_percentiles, sweep_table, verdict,
)
from sluice.bench.trace import TraceRecorder, load_trace

DEFAULT_TIMEOUT_S = 6 * 3600  # a whole long run's request may legitimately wait this long in a queue


# ---- flags ---------------------------------------------------------------------------------------------
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    target.add_argument("--base-url", metavar="URL", default=None,
                        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    target.add_argument("--host", metavar="HOST", default="127.0.0.1", help="used when --base-url is not given")
    target.add_argument("--port", metavar="PORT", type=int, default=8000, help="used when --base-url is not given")
    target.add_argument("--endpoint-type", default="completions", choices=list(ENDPOINT_PATHS),
                        help="/v1/completions or /v1/chat/completions (one user message)")
    target.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="vLLM's name for the body to send: openai or vllm (completions), openai-chat (chat)")
    target.add_argument("--endpoint", metavar="PATH", default=None,
                        help="path to send to; a .../chat/completions or .../completions path also picks the body "
                             "(default: the backend's or endpoint type's)")
    target.add_argument("--header", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra HTTP headers on every request, e.g. x-tenant=a")
    target.add_argument("--extra-body", default=None, metavar="JSON",
                        help="a JSON object merged into every request body, e.g. '{\"min_tokens\": 8}'")
    target.add_argument("--model", metavar="NAME", default=None,
                        help="model name for requests and tokenizer (default: the server's first)")
    target.add_argument("--served-model-name", metavar="NAME", default=None,
                        help="name to send, when it differs from --model")
    target.add_argument("--tokenizer", metavar="NAME", default=None,
                        help="tokenizer for token counts: folder, .gguf or hub id "
                             "(default: --model through sluice's loader)")
    target.add_argument("--api-key", metavar="KEY", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY)")
    target.add_argument("--request-timeout", metavar="S", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds one request may take")
    add_dataset_args(parser)
    load = parser.add_argument_group("load")
    load.add_argument("--max-concurrency", metavar="N", type=int, default=None,
                      help="most requests in flight (default: no limit)")
    load.add_argument("--request-rate", metavar="R", type=float, default=math.inf,
                      help="requests/s (default inf: all at once, limited only by --max-concurrency)")
    load.add_argument("--burstiness", metavar="B", type=float, default=1.0,
                      help="shape of the gamma-distributed gaps at a finite rate: 1 = Poisson, <1 burstier, "
                           ">1 more regular, inf = constant rate (evenly spaced)")
    load.add_argument("--sweep", default=None, metavar="MODE:LEVELS",
                      help="run every level: concurrency:1,2,4,8 or rate:1,2,4 (req/s); prints a table")
    load.add_argument("--slo", nargs="+", default=[], metavar="METRIC_STAT:MS",
                      help="sweep targets, e.g. ttft_p95:500 itl_p99:50 "
                           "(METRIC ttft|tpot|itl|e2el, STAT pNN|mean|median); "
                           "the sweep names the highest level meeting all, with every lower level meeting them too")
    load.add_argument("--num-warmups", metavar="N", type=int, default=0,
                      help="requests sent (with the first prompt) before the run and left out of its results")
    load.add_argument("--seed", metavar="N", type=int, default=0,
                      help="seeds the dataset and the arrival times (sweep level i: seed+i)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--ignore-eos", action="store_true",
                          help="send ignore_eos, so each request makes exactly its output length")
    sampling.add_argument("--temperature", metavar="T", type=float, default=0.0,
                          help="sent with every request (default greedy)")
    sampling.add_argument("--top-p", metavar="P", type=float, default=None)
    sampling.add_argument("--top-k", metavar="K", type=int, default=None)
    report = parser.add_argument_group("report")
    report.add_argument("--percentile-metrics", metavar="LIST", default="ttft,tpot,itl,e2el",
                        help="metrics to print percentiles of")
    report.add_argument("--metric-percentiles", metavar="LIST", default="90,95,99",
                        help="percentiles to print (mean and median always)")
    report.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                        help="count requests meeting every target, e.g. ttft:500 itl:50 e2el:5000 "
                             "(itl: the request's mean gap)")
    report.add_argument("--hourly-cost", type=float, default=None, metavar="USD",
                        help="infrastructure cost per hour: prints the cost per 1M output tokens")
    report.add_argument("--save-result", action="store_true",
                        help="write a JSON file: summary plus every request's record")
    report.add_argument("--result-dir", metavar="DIR", default=".", help="folder for --save-result")
    report.add_argument("--result-filename", metavar="NAME", default=None,
                        help="file name for --save-result (default: derived from the run)")
    report.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    report.add_argument("--save-trace", default=None, metavar="FILE",
                        help="record the server's engine over the run (its /dashboard stream: KV pool, queues, "
                             "each step's batch) into FILE as JSON lines; with --plot, draws engine_timeline.png")
    report.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def check_serve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate once, at the edge; parsed forms land on args (goodput_targets, slo_targets, sweep_mode, ...)."""
    problem = check_dataset_args(args)
    if problem:
        parser.error(problem)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.request_rate > 0:
        parser.error(f"--request-rate must be > 0, got {args.request_rate}")
    if not args.burstiness > 0:
        parser.error(f"--burstiness must be > 0, got {args.burstiness}")
    if not args.request_timeout > 0:
        parser.error(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.num_warmups < 0:
        parser.error(f"--num-warmups must be >= 0, got {args.num_warmups}")
    args.endpoint_kind = _parsed(parser, "--backend/--endpoint", endpoint_kind, args)
    args.extra_headers = _parsed(parser, "--header", parse_headers, args.header)
    args.extra_body_fields = _parsed(parser, "--extra-body", parse_extra_body, args.extra_body)
    if args.hourly_cost is not None and not args.hourly_cost > 0:
        parser.error(f"--hourly-cost must be > 0, got {args.hourly_cost}")
    args.print_metrics = _parse_list(parser, "--percentile-metrics", args.percentile_metrics, str)
    unknown = [m for m in args.print_metrics if m not in METRICS]
    if unknown:
        parser.error(f"--percentile-metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    args.print_percentiles = _parse_list(parser, "--metric-percentiles", args.metric_percentiles, float)
    if any(not 0 < p <= 100 for p in args.print_percentiles):
        parser.error(f"--metric-percentiles must be in (0, 100], got {args.metric_percentiles}")
    args.goodput_targets = _parsed(parser, "--goodput", parse_goodput, args.goodput) or None
    args.slo_targets = _parsed(parser, "--slo", parse_slos, args.slo)
    args.sweep_mode, args.sweep_levels = (None, [])
    if args.sweep:
        args.sweep_mode, args.sweep_levels = _parsed(parser, "--sweep", parse_sweep, args.sweep)
    if args.slo_targets and not args.sweep:
        parser.error("--slo needs --sweep (the targets choose a sweep level)")
    if args.sweep_mode == "concurrency" and args.max_concurrency is not None:
        parser.error("--sweep concurrency:... sets the concurrency; drop --max-concurrency")
    if args.sweep_mode == "rate" and not math.isinf(args.request_rate):
        parser.error("--sweep rate:... sets the request rate; drop --request-rate")


def endpoint_kind(args: argparse.Namespace) -> str:
    """The body to send: the --endpoint path's own kind, else --backend's, else --endpoint-type."""
    path = (args.endpoint or "").rstrip("/")
    by_path = "chat" if path.endswith("/chat/completions") else "completions" if path.endswith("/completions") else None
    by_backend = BACKENDS.get(args.backend)
    if by_path and by_backend and by_path != by_backend:
        raise ValueError(f"--backend {args.backend} sends a {by_backend} body, but --endpoint {args.endpoint} "
                         f"is a {by_path} endpoint")
    return by_path or by_backend or args.endpoint_type


def parse_headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"'{item}' is not KEY=VALUE")
        headers[key.strip()] = value.strip()
    return headers


def parse_extra_body(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        body = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return body


def _parsed(parser: argparse.ArgumentParser, flag: str, parse, value):
    try:
        return parse(value)
    except ValueError as e:
        parser.error(f"{flag}: {e}")


def _parse_list(parser: argparse.ArgumentParser, flag: str, text: str, kind) -> list:
    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"{flag}: expected a comma-separated list, got {text!r}")
    if not items:
        parser.error(f"{flag}: expected at least one item")
    return items


# ---- where to send -------------------------------------------------------------------------------------
def server_root(args: argparse.Namespace) -> str:
    root = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return root.removesuffix("/v1")


def first_served_model(root: str, headers: dict[str, str]) -> str:
    """The id of the server's first model, for runs without --model."""
    try:
        response = httpx.get(root + "/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"sluice bench serve: cannot list models at {root}/v1/models ({e}); pass --model") from None


def load_bench_tokenizer(name: str, explicit: bool, endpoint: Endpoint, root: str):
    """The tokenizer through sluice's loader, so a served alias, a .gguf path or a hub id all work;
    when --model names nothing loadable (a served name), the server's own /tokenize."""
    from sluice.loader import ModelLoadError, load_tokenizer, resolve_model

    try:
        return load_tokenizer(resolve_model(name))
    except (ModelLoadError, OSError, ValueError) as e:
        if explicit:
            raise SystemExit(f"sluice bench serve: --tokenizer {name}: cannot load a tokenizer ({e})") from None
        print(f"sluice bench serve: no tokenizer loads for {name!r} ({e}); counting tokens with the server's "
              f"/tokenize", file=sys.stderr)
        try:
            return ServerTokenizer(root, endpoint.headers(), endpoint.model)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise SystemExit(f"sluice bench serve: no tokenizer for {name!r} and the server's /tokenize failed "
                             f"({e}); pass --tokenizer") from None


def make_endpoint(args: argparse.Namespace, root: str, model: str) -> Endpoint:
    sampling = {"temperature": args.temperature}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    path = args.endpoint or ENDPOINT_PATHS[args.endpoint_kind]
    return Endpoint(root + path, args.endpoint_kind, args.served_model_name or model, args.api_key,
                    args.ignore_eos, sampling, args.extra_headers, args.extra_body_fields)


# ---- load ------------------------------------------------------------------------------------------------
def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """When each request is due, in seconds from the start. The first goes at once; the gaps after it
    follow a gamma distribution with mean 1/rate and shape `burstiness` (1: Poisson arrivals;
    inf: exactly 1/rate apart). An infinite rate sends everything at 0."""
    if math.isinf(rate):
        return [0.0] * num
    if math.isinf(burstiness):
        gaps = np.full(num, 1.0 / rate)
    else:
        gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


async def run_load(endpoint: Endpoint, requests: list[BenchRequest], due: list[float], max_concurrency: int | None,
                   timeout: float, progress: bool) -> tuple[list[RequestRecord], float]:
    """Send each request at its due time once a concurrency slot is free; return the records (in
    dataset order) and the wall time from the first send to the last response."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_concurrency or len(requests))
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="requests", dynamic_ncols=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        origin = time.perf_counter()

        async def one(index: int, request: BenchRequest, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, origin + at - time.perf_counter()))
            if slots is None:
                record = await send_request(client, endpoint, request, index, origin)
            else:
                async with slots:
                    record = await send_request(client, endpoint, request, index, origin)
            bar.update(1)
            return record

        records = await asyncio.gather(*(one(i, r, at) for i, (r, at) in enumerate(zip(requests, due))))
        duration = time.perf_counter() - origin
    bar.close()
    return list(records), duration


def warm_up(args: argparse.Namespace, endpoint: Endpoint, tokenizer) -> None:
    """--num-warmups requests with the run's first prompt, at the run's concurrency, unrecorded."""
    if not args.num_warmups:
        return
    first = build_requests(args, tokenizer, args.seed)[0]
    print(f"warming up with {args.num_warmups} requests")
    records, _ = asyncio.run(run_load(endpoint, [first] * args.num_warmups, [0.0] * args.num_warmups,
                                      args.max_concurrency, args.request_timeout, False))
    failed = [r for r in records if not r.success]
    if failed:
        print(f"sluice bench serve: {len(failed)} warm-up requests failed: {failed[0].error}", file=sys.stderr)


async def probe(endpoint: Endpoint, timeout: float) -> RequestRecord:
    """One tiny request before the run, so a wrong URL, model name or key fails fast and clearly."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(min(timeout, 300.0))) as client:
        return await send_request(client, endpoint, BenchRequest("Hello", 1, 1), -1, time.perf_counter())


def run_level(args: argparse.Namespace, endpoint: Endpoint, tokenizer, seed: int, rate: float,
              max_concurrency: int | None) -> tuple[dict, list[RequestRecord]]:
    """One benchmark run at one load: dataset, arrivals, requests, token counts, summary."""
    try:
        requests = build_requests(args, tokenizer, seed)
    except DatasetError as e:
        raise SystemExit(f"sluice bench serve: {e}") from None
    due = arrival_times(len(requests), rate, args.burstiness, seed)
    records, duration = asyncio.run(run_load(endpoint, requests, due, max_concurrency, args.request_timeout,
                                             not args.disable_tqdm))
    count_output_tokens(records, tokenizer)
    percentiles = sorted({*DEFAULT_PERCENTILES, *args.print_percentiles, *slo_percentiles(args.slo_targets)})
    summary = summarize(records, duration, percentiles, args.goodput_targets, args.hourly_cost)
    summary.update(request_rate=_json_number(rate), burstiness=_json_number(args.burstiness),
                   max_concurrency=max_concurrency)
    return summary, records


# ---- report ------------------------------------------------------------------------------------------
def format_summary(summary: dict, metrics: list[str], percentiles: list[float]) -> str:
    """The result block printed after a run."""
    rows = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Request rate configured (req/s)", summary["request_rate"]),
        ("Maximum request concurrency", summary["max_concurrency"] or "no limit"),
        ("Peak concurrent requests", summary["max_concurrent_requests"]),
        ("Benchmark duration (s)", summary["duration"]),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total input tokens (server usage)", summary["total_input_tokens_usage"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Total generated tokens (re-tokenized)", summary["total_output_tokens_retokenized"]),
        ("Total cached prompt tokens (usage)", summary["total_cached_tokens"]),
        ("Request throughput (req/s)", summary["request_throughput"]),
        ("Request goodput (req/s)", summary["request_goodput"]),
        ("Output token throughput (tok/s)", summary["output_throughput"]),
        ("Total token throughput (tok/s)", summary["total_token_throughput"]),
    ]
    if "cost_per_million_output_tokens" in summary:
        rows.append((f"Cost per 1M output tokens (USD, at ${summary['hourly_cost']:g}/h)",
                     summary["cost_per_million_output_tokens"]))
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{label + ':':<44}{_cell(value):>16}" for label, value in rows if value is not None]
    for name in metrics:
        upper = name.upper()
        lines.append("{:-^60}".format(f" {METRICS[name]} "))
        stats = [("Mean", "mean"), ("Median", "median")] + [(f"P{percentile_key(p)[1:]}", percentile_key(p))
                                                              for p in percentiles]
        for label, stat in stats:
            lines.append(f"{f'{label} {upper} (ms):':<44}{_cell(summary.get(f'{stat}_{name}_ms'), '-'):>16}")
    for reason, count in list(summary["errors"].items())[:5]:
        lines.append(f"failed x{count}: {reason[:200]}")
    lines.append("=" * 60)
    return "\n".join(lines)


def _cell(value, missing: str = "") -> str:
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _json_number(value: float) -> float | str:
    """JSON has no Infinity; write it as "inf" (as vLLM does)."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def run_config(args: argparse.Namespace, endpoint: Endpoint, tokenizer_name: str) -> dict:
    """What a saved result needs to be reproduced and compared."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend or ("openai-chat" if endpoint.kind == "chat" else "openai"),
        "endpoint_type": endpoint.kind,
        "url": endpoint.url,
        "model_id": endpoint.model,
        "tokenizer_id": tokenizer_name,
        "dataset_name": args.dataset_name,
        "dataset_path": args.dataset_path,
        "num_prompts": args.num_prompts,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "sampling": endpoint.sampling,
    }


def result_path(args: argparse.Namespace, config: dict) -> str:
    if args.result_filename:
        name = args.result_filename
    else:
        if args.sweep_mode:
            load = f"sweep-{args.sweep_mode}"
        else:
            load = f"{_json_number(args.request_rate)}qps-concurrency{args.max_concurrency or 'inf'}"
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", config["model_id"])
        name = f"sluice-bench-{config['endpoint_type']}-{load}-{model}-{config['date']}.json"
    return os.path.join(args.result_dir, name)


# ---- the command -------------------------------------------------------------------------------------
def run_bench_serve(args: argparse.Namespace) -> int:
    """`sluice bench serve`, after check_serve_args."""
    for noisy in ("httpx", "matplotlib"):  # a log line per request would bury the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = server_root(args)
    model = args.model or first_served_model(root, request_headers(args.api_key, args.extra_headers))
    endpoint = make_endpoint(args, root, model)
    tokenizer_name = args.tokenizer or model
    tokenizer = load_bench_tokenizer(tokenizer_name, args.tokenizer is not None, endpoint, root)
    check = asyncio.run(probe(endpoint, args.request_timeout))
    if not check.success:
        print(f"sluice bench serve: the test request to {endpoint.url} failed: {check.error}", file=sys.stderr)
        return 1
    warm_up(args, endpoint, tokenizer)
    config = run_config(args, endpoint, tokenizer_name)
    with contextlib.ExitStack() as stack:
        if args.save_trace:
            stack.enter_context(TraceRecorder(root, request_headers(args.api_key, args.extra_headers), args.save_trace))
        result, runs = run_levels(args, endpoint, tokenizer, config)
    if args.save_result:
        save_json(result_path(args, config), result)
    if args.plot:
        from sluice.bench.plots import engine_timeline, latency_cdfs, sweep_plots

        paths = [latency_cdfs(runs, args.plot)]
        if args.sweep_mode:
            paths += sweep_plots(args.sweep_mode, result["sweep"]["levels"], args.slo_targets, args.plot)
        if args.save_trace:
            paths.append(engine_timeline(load_trace(args.save_trace), args.plot))
        print("plots: " + ", ".join(paths))
    return 0


def run_levels(args: argparse.Namespace, endpoint: Endpoint, tokenizer,
               config: dict) -> tuple[dict, list[tuple[str, list[RequestRecord]]]]:
    """The sweep, or the one run: the result to save and the (label, records) runs to plot."""
    if args.sweep_mode:
        return run_sweep(args, endpoint, tokenizer, config)
    summary, records = run_level(args, endpoint, tokenizer, args.seed, args.request_rate, args.max_concurrency)
    print(format_summary(summary, args.print_metrics, args.print_percentiles))
    return {**config, **summary, "requests": [r.to_json() for r in records]}, [("run", records)]


def run_sweep(args: argparse.Namespace, endpoint: Endpoint, tokenizer,
              config: dict) -> tuple[dict, list[tuple[str, list[RequestRecord]]]]:
    """Every level in turn (level i with seed + i, so prompts do not repeat across levels), then the
    table and the chosen level."""
    mode, slos = args.sweep_mode, args.slo_targets
    levels, runs, level_results = [], [], []
    for i, level in enumerate(args.sweep_levels):
        print(f"\n--- {mode} {format_level(mode, level)} ({i + 1}/{len(args.sweep_levels)}) ---")
        if mode == "concurrency":
            summary, records = run_level(args, endpoint, tokenizer, args.seed + i, math.inf, int(level))
        else:
            summary, records = run_level(args, endpoint, tokenizer, args.seed + i, float(level), args.max_concurrency)
        summary.update(level=level, sweep_mode=mode, meets_slo=meets_slos(summary, slos) if slos else None)
        print(format_summary(summary, args.print_metrics, args.print_percentiles))
        levels.append(summary)
        runs.append((f"{mode} {format_level(mode, level)}", records))
        level_results.append({"level": level, "requests": [r.to_json() for r in records]})
    print()
    print(sweep_table(mode, levels, slos))
    print(verdict(mode, levels, slos))
    chosen = choose_level(levels, slos) if slos else None
    sweep = {"mode": mode, "levels": levels, "slo_targets_ms": slos,
             "chosen_level": chosen["level"] if chosen else None}
    return {**config, "sweep": sweep, "runs": level_results}, runs
