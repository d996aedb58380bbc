"""`sluice` command line. Engine flags use vLLM's spellings so existing scripts carry over."""

from __future__ import annotations

import argparse
import logging
import sys

from sluice.config import EXECUTOR_BACKENDS, CacheConfig, EngineConfig
from sluice.loader import DEFAULT_MODEL


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every engine knob of the offline `LLM`, as a CLI flag with vLLM's name."""
    parser.add_argument("model", nargs="?", default=None, help=f"HF folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights and activations dtype; auto picks the fastest here")
    parser.add_argument("--seed", type=int, default=0, help="global random seed")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    parser.add_argument("--block-size", type=int, default=None, help=f"tokens per KV cache block (default: {CacheConfig.block_size})")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="reuse KV blocks of shared prompt prefixes")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="exact number of KV cache blocks")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV cache size in bytes (default: a fraction of free memory)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="most requests in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None, help="per-request prefill chunk cap (default: a quarter of the budget)")
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"], help="fcfs, or priority (lower first, then arrival)")
    parser.add_argument("--max-num-queued-reqs", type=int, default=None, help="refuse new requests (503) while this many wait (default: no limit)")
    parser.add_argument("--max-num-queued-tokens", type=int, default=None, help="refuse new requests (503) while this many prompt tokens wait (default: no limit)")
    parser.add_argument("--distributed-executor-backend", default=None, choices=list(EXECUTOR_BACKENDS),
                        help="where the model worker runs: uni (in the engine core's process, default) or mp "
                             "(a process of its own)")
    parser.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput / queue / KV log line")
    parser.add_argument("--kv-cache-metrics", action="store_true", help="KV block lifetime, idle-before-evict and reuse-gap histograms on /metrics")
    parser.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                        help="export one OpenTelemetry span per request over OTLP (grpc; http/protobuf with "
                             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf)")
    parser.add_argument("--collect-detailed-traces", default=None, choices=["model", "worker", "all"],
                        help="also a span per engine step, with schedule / execute_model / update children "
                             "(needs --otlp-traces-endpoint)")
    parser.add_argument("--structured-outputs-compile-timeout", type=float, default=None, metavar="SECONDS", help="fail a structured-output request whose grammar has not compiled this long after it arrived (default: 30)")
    parser.add_argument("--structured-outputs-any-whitespace", action="store_true", default=None, help="let JSON grammars emit free runs of whitespace (vLLM's default form) instead of compact JSON")


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = EngineConfig.argument_names()
    return {name: value for name, value in vars(args).items() if name in names}


def run_chat(args: argparse.Namespace) -> int:
    """A small offline chat on the default model: reads user turns from stdin."""
    from sluice import LLM, SamplingParams

    llm = LLM(**{**engine_kwargs(args), "disable_log_stats": True})  # stats lines would interleave the chat
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    conversation: list[dict] = []
    interactive = sys.stdin.isatty()
    turns = [args.prompt] if args.prompt else None
    if turns is None and not interactive:
        turns = [line.strip() for line in sys.stdin if line.strip()] or ["What is PagedAttention, in two sentences?"]
    while True:
        if turns is not None:
            if not turns:
                return 0
            user = turns.pop(0)
            print(f"user> {user}")
        else:
            try:
                user = input("user> ").strip()
            except EOFError:
                return 0
            if not user:
                continue
        conversation.append({"role": "user", "content": user})
        reply = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0].text
        conversation.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}\n", flush=True)


def run_serve(args: argparse.Namespace) -> int:
    from sluice.entrypoints.openai.api_server import check_server_args, run_server

    check_server_args(args)
    try:
        config = EngineConfig.from_kwargs(**engine_kwargs(args))  # bad flags fail before any process starts
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sluice serve: {e}") from None
    return run_server(args, config)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sluice", description="LLM inference and serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve a model over an OpenAI-compatible HTTP API (vLLM's flags).")
    add_engine_args(serve)
    from sluice.entrypoints.openai.api_server import add_server_args

    add_server_args(serve)
    serve.set_defaults(func=run_serve)
    chat = sub.add_parser("chat", help="offline chat with a model in this terminal")
    add_engine_args(chat)
    chat.add_argument("--prompt", default=None, help="one user turn, then exit")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.set_defaults(func=run_chat)
    from sluice.bench.cli import add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
