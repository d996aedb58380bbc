"""`--tensor-parallel-size 2` against 1 on this machine, both engines alive and their runs
interleaved (the order alternating each round, so drift in the machine's load hits both alike):

- single-stream inter-token latency (ITL: the decode step with prefill subtracted, roofline.py's
  measure), and the time each of its decode steps spends in collectives (rank 0's all-reduces and
  logits all-gather, from the workers' own counters; waits for the slower rank included);
- W1 offline throughput (--num-prompts x 256 random tokens in, 128 out, greedy), and the share of
  its wall time rank 0 spent in collectives.

Each figure is the median over rounds of the per-round ratio TP=2 / TP=1; the load average
before and after is printed with them. Run it quiet: on 2 CPUs shared with other work, TP=1's two
OpenMP threads wait on each other at every matmul while each TP=2 rank runs one thread, and TP=1
collapses (seen at load average 8-16: TP=1 ITL 18x TP=2's), which says nothing about TP.

    .venv/bin/python benchmarks/tensor_parallel.py                  # ~5 minutes on 2 quiet cores
    .venv/bin/python benchmarks/tensor_parallel.py --model FOLDER --dtype float32 --num-prompts 0

The default model (SmolLM2-135M) has 9 attention heads, which 2 ranks cannot split; the default
here is a random model of its shapes with 8 heads of 72 (hidden 576, 30 layers, 2 KV heads,
intermediate 1536, its vocabulary), which costs the same per token. On 2 CPUs TP=2 puts each
rank on one CPU with one thread: this measures what splitting costs (collectives, a process
per rank) against one engine using both CPUs for every matmul, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from roofline import decode_step_seconds  # noqa: E402

from sluice import LLM  # noqa: E402
from sluice.bench.datasets import random_token_ids  # noqa: E402
from sluice.bench.offline import time_generate  # noqa: E402
from sluice.platform import cache_dir, cpu_model  # noqa: E402


def smollm2_shaped_model() -> str:
    """A random Llama of SmolLM2-135M's sizes whose heads split over 2 ranks (built once, cached)."""
    import transformers

    from sluice.loader import get_tokenizer
    from sluice.config import EngineConfig

    folder = Path(cache_dir("hf", "smollm2-shaped-8-heads"))
    if (folder / "config.json").is_file():
        return str(folder)
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=8, head_dim=72, num_key_value_heads=2, vocab_size=49152,
                                      max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    get_tokenizer(EngineConfig()).save_pretrained(folder)
    return str(folder)


def collectives(llm) -> dict:
    """Rank 0's collective seconds and calls since the last call (the counters reset)."""
    return llm.engine_core.executor.collective_rpc("communication_stats")[0]


def measure(llm, args: argparse.Namespace, round_: int) -> dict:
    """One round on one engine: ITL and its collectives per decode step; W1 and its collective share."""
    size = llm.config.parallel.tensor_parallel_size
    if size > 1:
        collectives(llm)  # reset
    itl = decode_step_seconds(llm, 1, args.input_len, args.output_len, seed=100 * round_)
    result = {"itl": itl}
    if size > 1:
        stats = collectives(llm)
        steps = 2 * (1 + args.output_len)  # two tries, each a 1-step prefill run and a whole run
        result |= {"comm_ms": stats["seconds"] / steps * 1e3, "comm_calls": stats["calls"] / steps}
    if args.num_prompts:
        prompts = random_token_ids(llm.get_tokenizer(), args.num_prompts, 256, 1000 + round_)
        run = time_generate(llm, prompts, [128] * args.num_prompts, use_tqdm=False)
        result["w1"] = run.output_tokens / run.elapsed
        if size > 1:
            result["w1_comm_share"] = collectives(llm)["seconds"] / run.elapsed
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a folder whose heads split over 2 ranks (default: see above)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=32, help="W1 prompts (256 in, 128 out); 0 skips W1")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of the per-round ratios")
    args = p.parse_args()
    model = args.model or smollm2_shaped_model()
    common = dict(dtype=args.dtype, max_model_len=1024, kv_cache_memory_bytes=512 << 20, enable_prefix_caching=False)
    engines = {1: LLM(model, **common), 2: LLM(model, **common, tensor_parallel_size=2)}
    load_before = os.getloadavg()[0]
    rounds = []
    for round_ in range(args.rounds):
        order = [1, 2] if round_ % 2 == 0 else [2, 1]
        rounds.append({size: measure(engines[size], args, round_) for size in order})
    load_after = os.getloadavg()[0]
    med = statistics.median
    itl1, itl2 = med(r[1]["itl"] for r in rounds), med(r[2]["itl"] for r in rounds)
    itl_ratio = med(r[2]["itl"] / r[1]["itl"] for r in rounds)
    comm = med(r[2]["comm_ms"] for r in rounds)
    comm_share = med(r[2]["comm_ms"] / (r[2]["itl"] * 1e3) for r in rounds)
    print(f"\n{args.rounds} interleaved rounds, dtype {args.dtype}, model {model}; CPU {cpu_model()} "
          f"({len(os.sched_getaffinity(0))} CPUs); load average {load_before:.1f} before, {load_after:.1f} after "
          f"({'under load' if max(load_before, load_after) > 1.5 else 'quiet'})")
    print("| measure | TP=1 | TP=2 | TP=2 / TP=1 (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    print(f"| single-stream ITL ms ({args.input_len} in, {args.output_len} out) | {itl1 * 1e3:.2f} | {itl2 * 1e3:.2f} "
          f"| {itl_ratio:.2f} |")
    print(f"| collectives per decode step, ms (rank 0, waits included) | - | {comm:.2f} "
          f"({med(r[2]['comm_calls'] for r in rounds):.0f} calls, {comm_share:.0%} of the step) | - |")
    config = engines[1].engine_core.executor.worker.runner.model.config
    width = 2 if engines[1].config.model.torch_dtype != torch.float32 else 4
    print(f"| data per decoded token, each rank | - | all-reduce {2 * config.num_hidden_layers + 1} x "
          f"{config.hidden_size * width} B, all-gather {-(-config.vocab_size // 2) * width} B of logits | - |")
    if args.num_prompts:
        w1_1, w1_2 = med(r[1]["w1"] for r in rounds), med(r[2]["w1"] for r in rounds)
        print(f"| W1 output tok/s ({args.num_prompts} x 256 in, 128 out) | {w1_1:.1f} | {w1_2:.1f} "
              f"| {med(r[2]['w1'] / r[1]['w1'] for r in rounds):.2f} |")
        print(f"| W1 wall time in collectives (rank 0) | - | {med(r[2]['w1_comm_share'] for r in rounds):.0%} | - |")
    for llm in engines.values():
        llm.engine_core.shutdown()


if __name__ == "__main__":
    main()
