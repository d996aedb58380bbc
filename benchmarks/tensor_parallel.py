"""`--tensor-parallel-size 2` against 1 on this machine: single-stream inter-token latency (ITL,
the decode step with prefill subtracted, roofline.py's measure) and the time each decode step
spends in the all-reduces and the logits all-gather (rank 0's collectives, from the workers'
own counters), both engines alive and their runs interleaved.

    .venv/bin/python benchmarks/tensor_parallel.py                  # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/tensor_parallel.py --model FOLDER --dtype float32

The default model (SmolLM2-135M) has 9 attention heads, which 2 ranks cannot split; the default
here is a random model of its shapes with 8 heads of 72 (hidden 576, 30 layers, 2 KV heads,
intermediate 1536, its vocabulary), which costs the same per token. On 2 CPUs TP=2 puts each
rank on one CPU with one thread: this measures what splitting costs (collectives, a process
per rank) against one engine using both CPUs for every matmul, not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from roofline import decode_step_seconds  # noqa: E402

from sluice import LLM  # noqa: E402
from sluice.platform import cache_dir, cpu_model  # noqa: E402


def smollm2_shaped_model() -> str:
    """A random Llama of SmolLM2-135M's sizes whose heads split over 2 ranks (built once, cached)."""
    import torch
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a folder whose heads split over 2 ranks (default: see above)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median of each engine's")
    args = p.parse_args()
    model = args.model or smollm2_shaped_model()
    common = dict(dtype=args.dtype, max_model_len=1024, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False)
    engines = {1: LLM(model, **common), 2: LLM(model, **common, tensor_parallel_size=2)}
    itl: dict[int, list[float]] = {1: [], 2: []}
    collective_ms, collective_calls = [], []
    for round_ in range(args.rounds):
        for size, llm in engines.items():
            if size == 2:
                llm.engine_core.executor.collective_rpc("communication_stats")  # reset the counters
            itl[size].append(decode_step_seconds(llm, 1, args.input_len, args.output_len, seed=100 * round_))
            if size == 2:
                stats = llm.engine_core.executor.collective_rpc("communication_stats")[0]
                steps = 2 * (1 + args.output_len)  # two tries, each a 1-step prefill run and a whole run
                collective_ms.append(stats["seconds"] / steps * 1e3)
                collective_calls.append(stats["calls"] / steps)
    one, two = statistics.median(itl[1]), statistics.median(itl[2])
    comm = statistics.median(collective_ms)
    print(f"\nsingle-stream decode, {args.input_len} prompt tokens, {args.output_len} generated, dtype {args.dtype}, "
          f"model {model}; CPU {cpu_model()} ({len(__import__('os').sched_getaffinity(0))} CPUs); "
          f"median of {args.rounds} interleaved rounds")
    # a collective's time includes waiting for the slower rank: on a loaded machine, most of a step
    print("| tensor_parallel_size | ITL ms | vs TP=1 | in collectives ms/step (rank 0, waits included) | share |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| 1 | {one * 1e3:.2f} | 1.00 | - | - |")
    print(f"| 2 | {two * 1e3:.2f} | {two / one:.2f} | {comm:.2f} ({statistics.median(collective_calls):.0f} calls) | "
          f"{comm / (two * 1e3):.0%} |")
    for llm in engines.values():
        llm.engine_core.shutdown()


if __name__ == "__main__":
    main()
