"""Offline throughput on random prompts, optionally against Hugging Face transformers.
(`sluice bench throughput` is the user-facing command; this script adds the transformers comparison.)

    python benchmarks/throughput.py                       # default model, 128 x (256 in, 128 out)
    python benchmarks/throughput.py --num-prompts 16 --compare-hf

Prompts are seeded random token ids (no special tokens) passed as token ids, and
every request generates exactly --output-len tokens (ignore_eos), so both sides do
the same work.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sluice.bench.datasets import random_token_ids
from sluice.bench.offline import ThroughputResult, report, time_generate, warm_up
from sluice.loader import ModelSource, load_tokenizer, resolve_model

HF_BATCH_SIZE = 16
DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # "auto" as sluice.LLM


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="folder, .gguf file or hub id (default: the default model)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' batched generate")
    args = p.parse_args()
    for name in ("input_len", "output_len", "num_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def bench_sluice(args: argparse.Namespace, prompts: list[list[int]]) -> float:
    from sluice import LLM

    engine_args = {"model": args.model, "dtype": args.dtype, "seed": args.seed}
    if args.max_num_seqs is not None:
        engine_args["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(**engine_args)
    warm_up(llm)
    return report("sluice", time_generate(llm, prompts, [args.output_len] * len(prompts)))


def load_hf_model(src: ModelSource, dtype: torch.dtype):
    import transformers

    if src.kind == "gguf":
        folder, filename = os.path.split(src.path)
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=filename,
            dtype=dtype,
            quantization_config=transformers.GgufConfig(dequantize=True),  # dense weights, like sluice
        )
    return transformers.AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)


def left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def bench_hf(args: argparse.Namespace, src: ModelSource, tokenizer, prompts: list[list[int]]) -> float:
    model = load_hf_model(src, DTYPES[args.dtype]).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(batch: list[list[int]], new_tokens: int) -> int:
        ids, mask = left_padded(batch, pad_id)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            )
        return out[:, ids.shape[1]:].numel()

    generate([prompts[0][:8]], 2)  # warm-up
    start = time.perf_counter()
    output_tokens = sum(
        generate(prompts[i:i + HF_BATCH_SIZE], args.output_len) for i in range(0, len(prompts), HF_BATCH_SIZE)
    )
    elapsed = time.perf_counter() - start
    result = ThroughputResult(elapsed, len(prompts), sum(map(len, prompts)), output_tokens)
    return report(f"hf batch={HF_BATCH_SIZE}", result)


def main() -> None:
    args = parse_args()
    src = resolve_model(args.model)
    tokenizer = load_tokenizer(src)
    prompts = random_token_ids(tokenizer, args.num_prompts, args.input_len, args.seed)
    print(
        f"model={src.name} ({src.path}) dtype={args.dtype} prompts={args.num_prompts} "
        f"input_len={args.input_len} output_len={args.output_len} threads={torch.get_num_threads()}"
    )
    sluice_tps = bench_sluice(args, prompts)
    if args.compare_hf:
        hf_tps = bench_hf(args, src, tokenizer, prompts)
        print(f"[compare] output tokens/s sluice/hf: {sluice_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
