"""Multi-LoRA serving cost: what adapters take from a server's throughput and latency.

One `sluice serve --enable-lora` of the model with --num-adapters PEFT adapters of rank --rank
on every projection (q/k/v/o/gate/up/down, random weights, written here), driven by sluice's
bench client with W2's shape (random 256-token prompts, 128 output tokens, streamed completions):
- serving: --concurrency 8, the requests spread round-robin over the adapters, against the same
  requests all sent to the base model (goal: output tok/s with adapters >= 0.8x the base's);
- single stream: concurrency 1 with one adapter against the base model (goal: ITL p50 <= 1.2x).
Each pair runs --repeats times interleaved; the best of each side is kept.

    python benchmarks/lora.py                  # the default model, bf16, 4 adapters of rank 16
    python benchmarks/lora.py --num-prompts 64 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx
import torch
from safetensors.torch import save_file

from sluice.bench.client import Endpoint, send_request
from sluice.bench.datasets import random_requests
from sluice.bench.metrics import count_output_tokens, summarize
from sluice.config import EngineConfig
from sluice.loader import get_tokenizer, load_hf_config, model_source

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=32, help="requests per serving run")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--itl-requests", type=int, default=3, help="requests per single-stream run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8765)
    return p.parse_args()


def write_adapter(folder: str, hf_config, rank: int, seed: int) -> None:
    """A PEFT adapter on every projection of every layer, as PEFT saves one."""
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    parts = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{parts.get(name, 'mlp')}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                   "bias": "none"}, f)


def start_server(args: argparse.Namespace, adapters: dict[str, str]) -> subprocess.Popen:
    modules = [f"{name}={path}" for name, path in adapters.items()]
    model = [args.model] if args.model else []
    command = [sys.executable, "-m", "sluice.entrypoints.cli", "serve", *model, "--dtype", args.dtype,
               "--port", str(args.port), "--enable-lora", "--max-loras", str(len(adapters)),
               "--max-lora-rank", str(args.rank), "--served-model-name", "base", "--lora-modules", *modules,
               "--disable-uvicorn-access-log"]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    raise SystemExit("the server did not start within 600 s")


async def run(url: str, models: list[str], requests, concurrency: int, tokenizer) -> dict:
    """Send the requests (model i % len(models)) at this concurrency; vLLM-named summary."""
    endpoints = [Endpoint(url, "completions", model, ignore_eos=True, sampling={"temperature": 0.0})
                 for model in models]
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        origin = time.perf_counter()

        async def one(index: int, request):
            async with slots:
                return await send_request(client, endpoints[index % len(endpoints)], request, index, origin)

        records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - origin
    count_output_tokens(records, tokenizer)
    summary = summarize(list(records), duration)
    if summary["failed"]:
        raise SystemExit(f"requests failed: {summary['errors']}")
    return summary


def best_pair(url: str, base: list[str], lora: list[str], requests, concurrency: int, repeats: int,
              key: str, higher: bool, tokenizer) -> tuple[float, float]:
    """The best `key` of each side over interleaved repeats."""
    pick = max if higher else min
    results: dict[str, list[float]] = {"base": [], "lora": []}
    for _ in range(repeats):
        for side, models in (("base", base), ("lora", lora)):
            results[side].append(asyncio.run(run(url, models, requests, concurrency, tokenizer))[key])
    return pick(results["base"]), pick(results["lora"])


def main() -> None:
    args = parse_args()
    config = EngineConfig.from_kwargs(model=args.model)
    hf_config = load_hf_config(model_source(config))
    tokenizer = get_tokenizer(config)
    folder = tempfile.mkdtemp(prefix="sluice-lora-bench-")
    adapters = {f"lora{i}": os.path.join(folder, f"lora{i}") for i in range(args.num_adapters)}
    for seed, path in enumerate(adapters.values()):
        write_adapter(path, hf_config, args.rank, seed)
    server = start_server(args, adapters)
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    try:
        serving = random_requests(tokenizer, args.num_prompts, args.input_len, args.output_len, 0.0, seed=0)
        single = random_requests(tokenizer, args.itl_requests, args.input_len, args.output_len, 0.0, seed=1)
        names = list(adapters)
        asyncio.run(run(url, ["base"] + names, serving[: 2 * len(names) + 2], args.concurrency, tokenizer))  # warm-up
        base_tok_s, lora_tok_s = best_pair(url, ["base"], names, serving, args.concurrency, args.repeats,
                                           "output_throughput", higher=True, tokenizer=tokenizer)
        base_itl, lora_itl = best_pair(url, ["base"], names[:1], single, 1, args.repeats, "median_itl_ms",
                                       higher=False, tokenizer=tokenizer)
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = [(f"c={args.concurrency} output tok/s ({len(names)} adapters of rank {args.rank})", base_tok_s, lora_tok_s,
             lora_tok_s / base_tok_s, ">= 0.8"),
            ("single-stream ITL p50 (ms, 1 adapter)", base_itl, lora_itl, lora_itl / base_itl, "<= 1.2")]
    print(f"\n{'':56} {'base':>9} {'LoRA':>9} {'ratio':>7}  goal")
    for label, base, lora, ratio, goal in rows:
        print(f"{label:56} {base:9.2f} {lora:9.2f} {ratio:7.2f}  {goal}")


if __name__ == "__main__":
    main()
