"""`sluice` command line. Engine flags use vLLM's spellings so existing scripts carry over."""

from __future__ import annotations

import argparse
import logging
import sys

import sluice
from sluice.engine.arg_utils import add_engine_args, engine_config, engine_kwargs, parse_args

logger = logging.getLogger("sluice")


def run_chat(args: argparse.Namespace) -> int:
    """A small offline chat on the default model: reads user turns from stdin."""
    from sluice import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=llm.config.model.seed)
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
        config = engine_config(args)  # bad flags fail before any process starts
    except (TypeError, ValueError) as e:
        raise SystemExit(f"sluice serve: {e}") from None
    for note in config.notes():
        logger.info(note)
    return run_server(args, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=sluice.__version__)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(build_parser(), argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
