"""Decode step time of a Mixtral-shaped mixture of experts against a dense Llama with the same
active parameters, both random-weight bf16 checkpoints, one engine after the other.

    .venv/bin/python benchmarks/moe.py                  # 8 experts, top-2, hidden 1024, 4 layers
    .venv/bin/python benchmarks/moe.py --layers 2 --iters 2 --output-len 16   # a smoke test
    .venv/bin/python benchmarks/moe.py --keep DIR       # keep both checkpoints, then W1 against vLLM's CPU build:
    .venv/bin/python benchmarks/compare_vllm.py --workloads w1 --model-dir DIR/moe    # (and DIR/dense)

The MoE has 8 experts of intermediate I, 2 routed per token; the dense model has one MLP of
intermediate 2 I, so both read the same weights per token at batch 1. Everything else (attention,
embeddings, vocabulary) is the same. A step's time is (whole request - prefill-only request) /
(output tokens - 1), as in `sluice bench latency`, the best of --iters runs on fresh prompts. At
batch 16 the 32 routed (token, expert) pairs touch nearly all 8 experts, so the MoE reads up to
4x the dense model's weights: a step is then bounded by memory bandwidth or by compute, whichever
the machine runs out of first. Goal: MoE / dense within 1.5x.

Run time on a shared 2-core machine (load 10-15, so the timings themselves meant nothing): the
smoke test above 2.5 minutes, the default run 24 minutes at nice 19, of which building and saving
the two random checkpoints (~1 GB for the MoE) took about 10; `--keep DIR` reuses them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def build_checkpoints(folder: Path, layers: int, hidden: int, experts: int, top_k: int,
                      expert_intermediate: int) -> dict[str, str]:
    """Random bf16 HF folders {"moe": ..., "dense": ...} with the default model's tokenizer."""
    import transformers

    from sluice.loader import load_tokenizer, resolve_model

    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                  num_key_value_heads=max(1, hidden // 512), vocab_size=49152, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    configs = {
        "moe": transformers.MixtralConfig(**common, intermediate_size=expert_intermediate, num_local_experts=experts,
                                          num_experts_per_tok=top_k),
        "dense": transformers.LlamaConfig(**common, intermediate_size=top_k * expert_intermediate),
    }
    paths = {}
    for name, config in configs.items():
        path = folder / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path)
            load_tokenizer(resolve_model(None)).save_pretrained(path)
        paths[name] = str(path)
    return paths


def decode_step_ms(model: str, batch_sizes: list[int], input_len: int, output_len: int, iters: int) -> dict[int, float]:
    """Best per-token decode time (ms) at each batch size."""
    from sluice import LLM
    from sluice.bench.offline import time_batch

    llm = LLM(model, dtype="bfloat16", max_model_len=input_len + output_len + 16, enable_prefix_caching=False,
              kv_cache_memory_bytes=512 << 20)
    time_batch(llm, max(batch_sizes), input_len, 4, seed=0)  # warm: packing, page faults, threads
    best = {}
    for batch in batch_sizes:
        runs = [time_batch(llm, batch, input_len, output_len, seed=100 * batch + 2 * i) for i in range(iters)]
        best[batch] = min((whole - prefill) * 1000 / (output_len - 1) for prefill, whole in runs)
    del llm
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-intermediate", type=int, default=3584, help="Mixtral's 14336 / 4096 x hidden")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", default=None, help="build (or reuse) the checkpoints here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = build_checkpoints(folder, args.layers, args.hidden, args.experts, args.top_k, args.expert_intermediate)
        times = {name: decode_step_ms(path, args.batch_sizes, args.input_len, args.output_len, args.iters)
                 for name, path in paths.items()}

    print(f"\n{args.experts} experts top-{args.top_k}, hidden {args.hidden}, expert intermediate "
          f"{args.expert_intermediate} vs dense {args.top_k * args.expert_intermediate}, {args.layers} layers, bf16, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'moe ms/step':>12} {'dense ms/step':>14} {'moe/dense':>10}")
    for batch in args.batch_sizes:
        moe, dense = times["moe"][batch], times["dense"][batch]
        print(f"{batch:>6} {moe:>12.2f} {dense:>14.2f} {moe / dense:>10.2f}")
    if args.keep:
        print(f"checkpoints kept in {os.path.abspath(args.keep)}")


if __name__ == "__main__":
    main()
