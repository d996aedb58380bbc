"""KV memory of one long chat on a windowed model: the blocks a 30,000-token request (prompt plus
generation) holds as it ends, against window/block_size, and against a full-attention model of
the same shape (the same random Mistral with sliding_window=None).

    .venv/bin/python benchmarks/sliding_window_memory.py [--context 30000] [--generate 200]
        [--window 4096] [--block-size 16] [--dtype bfloat16]

The models are random and small (Mistral's layout, hidden 128, 2 layers, GQA 4/2 heads of 32), so
the run takes a few minutes on 2 cores, most of it the full-attention model's 30,000-token prefill;
what it measures, blocks held, does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import transformers

from sluice import LLM, SamplingParams
from sluice.loader import resolve_model

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=49152, max_position_embeddings=32768,
             bos_token_id=1, eos_token_id=2, architectures=["MistralForCausalLM"])


def save_model(folder: str, window: int | None) -> None:
    """A random Mistral (seed 0) and the default model's tokenizer, which the engine loads."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**SHAPE, sliding_window=window)
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    gguf = resolve_model(None).path
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.save_pretrained(folder)


def run(folder: str, args) -> dict:
    """One request of args.context tokens; blocks held after every step."""
    llm = LLM(folder, dtype=args.dtype, block_size=args.block_size, max_model_len=args.context + 1,
              max_num_seqs=1, enable_prefix_caching=False, kv_cache_memory_bytes=args.kv_cache_mib << 20)
    core = llm.engine_core
    prompt = torch.randint(3, SHAPE["vocab_size"], (args.context - args.generate,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.generate, ignore_eos=True)
    (request,) = llm.input_processor.make_requests("chat", prompt, params)
    started = time.monotonic()
    core.add_request(request)
    held = []
    while core.has_unfinished_requests():
        core.step()
        held.append(core.kv.num_held_blocks("chat"))
    return {"window": core.kv.sliding_window, "end": held[-2], "peak": max(held), "steps": len(held),
            "seconds": time.monotonic() - started, "block_bytes": core.executor.describe()["bytes_per_block"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=30000, help="prompt plus generated tokens")
    parser.add_argument("--generate", type=int, default=200)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, window in (("windowed", args.window), ("full attention", None)):
            folder = f"{tmp}/{'windowed' if window else 'full'}"
            save_model(folder, window)
            results[name] = run(folder, args)
    bound = -(-args.window // args.block_size)
    print(f"one request of {args.context} tokens ({args.context - args.generate} prompt + {args.generate} "
          f"generated), blocks of {args.block_size} tokens, {args.dtype}")
    print(f"{'model':16} {'window':>7} {'blocks at end':>14} {'peak blocks':>12} {'KV MiB at end':>14} "
          f"{'vs window/block':>16} {'steps':>6} {'seconds':>8}")
    for name, r in results.items():
        mib = r["end"] * r["block_bytes"] / 2**20
        print(f"{name:16} {r['window'] or '-':>7} {r['end']:14d} {r['peak']:12d} {mib:14.1f} "
              f"{r['end'] / bound:15.2f}x {r['steps']:6d} {r['seconds']:8.1f}")
    print(f"window/block_size = {bound} blocks; the full-attention model holds "
          f"{results['full attention']['end'] / results['windowed']['end']:.1f}x the windowed one's blocks")


if __name__ == "__main__":
    main()
