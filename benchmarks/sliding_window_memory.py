"""KV memory of one long chat on windowed models: the bytes a 30,000-token request (prompt plus
generation) holds as it ends.

- Mistral's layout (a window on every layer) against the same random model with
  sliding_window=None: the windowed one holds about window/block_size blocks.
- Gemma 2's layout (windowed and global layers alternate) with the hybrid KV cache groups against
  disable_hybrid_kv_cache_manager=True (one group: every layer keeps every token, as before the
  hybrid allocator): the global layers still grow, so about half the bytes. The same block counts
  are also priced at Gemma 2 2B's shape (26 layers, 4 KV heads of 256, bfloat16).

    .venv/bin/python benchmarks/sliding_window_memory.py [--context 30000] [--generate 200]
        [--window 4096] [--block-size 16] [--dtype bfloat16] [--models gemma2 mistral]

The models are random and small (hidden 128, GQA 4/2 heads of 32; Mistral 2 layers, Gemma 2 4),
so the run takes minutes on 2 cores, most of it the 30,000-token prefills of global layers; what
it measures, blocks held, does not depend on the weights.
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

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             vocab_size=49152, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2)
GEMMA2_2B_TOKEN_LAYER_BYTES = 2 * 4 * 256 * 2  # K and V of one token in one layer, bfloat16
GEMMA2_2B_LAYERS = 26


def make_config(model: str, window: int | None):
    if model == "mistral":
        return transformers.MistralConfig(**SHAPE, num_hidden_layers=2, sliding_window=window,
                                          architectures=["MistralForCausalLM"])
    return transformers.Gemma2Config(**SHAPE, num_hidden_layers=4, sliding_window=window, query_pre_attn_scalar=32,
                                     architectures=["Gemma2ForCausalLM"])


def save_model(folder: str, config) -> None:
    """A random model (seed 0) and the default model's tokenizer, which the engine loads."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    gguf = resolve_model(None).path
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.save_pretrained(folder)


def run(folder: str, args, **engine_args) -> dict:
    """One request of args.context tokens; blocks held (per KV cache group) after every step."""
    llm = LLM(folder, dtype=args.dtype, block_size=args.block_size, max_model_len=args.context + 1,
              max_num_seqs=1, enable_prefix_caching=False, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              **engine_args)
    core = llm.engine_core
    prompt = torch.randint(3, SHAPE["vocab_size"], (args.context - args.generate,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.generate, ignore_eos=True)
    (request,) = llm.input_processor.make_requests("chat", prompt, params)
    started = time.monotonic()
    core.add_request(request)
    held = []
    windows = core.kv.group_windows
    while core.has_unfinished_requests():
        core.step()
        held.append([core.kv.num_held_blocks("chat", g) for g in range(len(windows))])
    block_bytes = core.executor.describe()["bytes_per_block"]
    return {"groups": core.kv.spec.describe_groups() or "1 full attention", "end": held[-2],
            "peak": max(sum(h) for h in held), "block_bytes": block_bytes, "windows": windows,
            "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=30000, help="prompt plus generated tokens")
    parser.add_argument("--generate", type=int, default=200)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["gemma2", "mistral"], choices=["gemma2", "mistral"])
    args = parser.parse_args()
    cases = {"gemma2": [("gemma2 hybrid", args.window, {}),
                        ("gemma2 one group", args.window, {"disable_hybrid_kv_cache_manager": True})],
             "mistral": [("mistral windowed", args.window, {}), ("mistral full", None, {})]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for name, window, engine_args in cases[model]:
                folder = f"{tmp}/{model}-{window}"
                if not os.path.isdir(folder):
                    save_model(folder, make_config(model, window))
                results[name] = run(folder, args, **engine_args)
    print(f"one request of {args.context} tokens ({args.context - args.generate} prompt + {args.generate} "
          f"generated), blocks of {args.block_size} tokens, {args.dtype}, window {args.window}")
    print(f"{'case':17} {'KV cache groups':58} {'blocks at end (per group)':>30} {'KV MiB at end':>14} "
          f"{'peak MiB':>9} {'seconds':>8}")
    for name, r in results.items():
        groups = "+".join(str(n) for n in r["end"]) if len(r["end"]) > 1 else str(r["end"][0])
        print(f"{name:17} {r['groups']:58} {groups:>30} {sum(r['end']) * r['block_bytes'] / 2**20:14.1f} "
              f"{r['peak'] * r['block_bytes'] / 2**20:9.1f} {r['seconds']:8.1f}")
    if "gemma2 hybrid" in results:
        hybrid, one = results["gemma2 hybrid"], results["gemma2 one group"]
        ratio = (sum(hybrid["end"]) * hybrid["block_bytes"]) / (sum(one["end"]) * one["block_bytes"])
        at_2b = [sum(r["end"]) * (GEMMA2_2B_LAYERS // len(r["windows"])) * args.block_size
                 * GEMMA2_2B_TOKEN_LAYER_BYTES for r in (hybrid, one)]
        print(f"gemma2 KV bytes at the end, hybrid / one group: {ratio:.3f}; priced at Gemma 2 2B's shape "
              f"({GEMMA2_2B_LAYERS} layers, 4 KV heads of 256, bf16): {at_2b[0] / 2**30:.2f} GiB vs "
              f"{at_2b[1] / 2**30:.2f} GiB")
    if "mistral windowed" in results:
        windowed, full = results["mistral windowed"], results["mistral full"]
        print(f"mistral: window/block_size = {-(-args.window // args.block_size)} blocks; the full-attention "
              f"model holds {sum(full['end']) / sum(windowed['end']):.1f}x the windowed one's blocks")


if __name__ == "__main__":
    main()
