"""Embedding throughput: sequences/s for 512-token inputs, batch 64, sluice's BERT against
transformers' BertModel with the same pooling (mean + normalize), same process, same CPU.
Random weights in bge-small-en-v1.5's shape (12 layers, hidden 384): the time does not depend
on the values. Goal: sluice >= 1.5x transformers.

    .venv/bin/python benchmarks/embeddings.py                      # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/embeddings.py --layers 2 --rounds 1  # a smoke test

Both sides get the same token ids; each round times one LLM.embed of the batch, then one
transformers forward pass over the whole batch (no padding: every input is 512 tokens, so
transformers wastes nothing on padding either), so load from other processes falls on both.
The ratio is given for wall time and for process CPU time (steadier on a shared machine).
Each side runs at the dtype its user gets by default (sluice: --dtype auto; sentence-
transformers: float32); --dtype / --hf-dtype compare others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def build_checkpoint(folder: str, layers: int) -> None:
    """A random BertModel folder with a WordPiece vocabulary of bge's size and mean pooling."""
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=layers,
                                     num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(config.vocab_size - 5)]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    transformers.BertTokenizerFast(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump([{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], f)
    os.makedirs(os.path.join(folder, "1_Pooling"))
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_tokens": True}, f)


def timed(run) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one call: under load the
    CPU time still counts only the work done, while the wall time also counts waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (sluice, then transformers)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="sluice's dtype (auto: what `sluice serve` picks on this CPU)")
    parser.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="transformers' dtype (float32: what sentence-transformers loads by default)")
    parser.add_argument("--quantization", default="auto", choices=("auto", "int8"),
                        help="sluice's --quantization (int8: weights per output channel, activations per token, "
                             "the VNNI kernel; the min cosine printed says what it costs)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = parser.parse_args()
    import transformers

    from sluice.entrypoints.llm import LLM

    folder = tempfile.mkdtemp(prefix="sluice-embed-bench-")
    build_checkpoint(folder, args.layers)
    generator = torch.Generator().manual_seed(0)
    body = torch.randint(5, 30522, (args.batch, args.input_len - 2), generator=generator)
    ids = torch.cat([torch.full((args.batch, 1), 2), body, torch.full((args.batch, 1), 3)], dim=1)
    prompts = [{"prompt_token_ids": row} for row in ids.tolist()]

    llm = LLM(folder, dtype=args.dtype, quantization=args.quantization,
              max_num_batched_tokens=args.max_num_batched_tokens)
    sluice_dtype = llm.engine_core.executor.worker.runner.dtype
    hf = transformers.BertModel.from_pretrained(folder, dtype=getattr(torch, args.hf_dtype)).eval()

    @torch.inference_mode()
    def reference() -> torch.Tensor:
        states = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return torch.nn.functional.normalize(states.float().mean(1), dim=-1)

    ours = torch.tensor([o.outputs.embedding for o in llm.embed(prompts)])  # also the warm-up
    cosine = torch.nn.functional.cosine_similarity(ours, reference(), dim=1).min().item()
    print(f"{args.batch} x {args.input_len} tokens, {args.layers} layers, {torch.get_num_threads()} threads; "
          f"sluice {str(sluice_dtype).removeprefix('torch.')} (--dtype {args.dtype}, --quantization "
          f"{args.quantization}), transformers "
          f"{args.hf_dtype}; min cosine to transformers {cosine:.6f}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    ratios = []
    for i in range(args.rounds):
        sluice_wall, sluice_cpu = timed(lambda: llm.embed(prompts))
        hf_wall, hf_cpu = timed(reference)
        ratios.append((hf_wall / sluice_wall, hf_cpu / sluice_cpu))
        print(f"round {i}: sluice {args.batch / sluice_wall:6.2f} seq/s ({sluice_wall:.2f} s wall, {sluice_cpu:.2f} "
              f"s CPU); transformers {args.batch / hf_wall:6.2f} seq/s ({hf_wall:.2f} s wall, {hf_cpu:.2f} s CPU); "
              f"speedup {ratios[-1][0]:.2f}x wall, {ratios[-1][1]:.2f}x CPU")
    wall, cpu = (statistics.median(r[k] for r in ratios) for k in (0, 1))
    print(f"median speedup over {args.rounds} rounds: {wall:.2f}x wall, {cpu:.2f}x CPU time (goal >= 1.5x)")


if __name__ == "__main__":
    main()
