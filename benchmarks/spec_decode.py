"""Single-stream speculative decoding: inter-token latency with and without n-gram drafts.

Two workloads on one model, both engines built in this process one after the other:
- copy: "rewrite this code with one change", the code being a file of this repository, so the
  answer repeats its input and drafts from the context are often right;
- random: prompts of random token ids, sampled at temperature 1 with a fixed seed (nothing to
  copy; greedy output of a random prompt soon loops, which n-grams would predict).

ITL = (time for the whole answer - time for its first token) / (tokens - 1), each the best of
--repeats runs; copy is greedy. Prints a table with the ratio speculative / plain and the mean acceptance
length (tokens per verification: kept drafts + 1).

    python benchmarks/spec_decode.py                      # the default model, bf16
    python benchmarks/spec_decode.py --num-speculative-tokens 3 --prompt-lookup-max 2
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from sluice import LLM, SamplingParams

CODE_FILE = Path(__file__).resolve().parents[1] / "sluice" / "spec_decode" / "ngram.py"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--prompt-lookup-max", type=int, default=3)
    p.add_argument("--output-len", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def copy_prompt(llm: LLM) -> dict:
    code = CODE_FILE.read_text()
    message = ("Rewrite this Python code with one change: rename the class NgramProposer to PromptLookup. "
               "Reply with the whole code and nothing else.\n\n" + code)
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def random_prompt(vocab_size: int, length: int = 256) -> dict:
    rng = random.Random(0)
    return {"prompt_token_ids": [rng.randrange(100, vocab_size) for _ in range(length)]}


def run_time(llm: LLM, prompt: dict, max_tokens: int, temperature: float) -> tuple[float, int]:
    """Seconds for one request, and the tokens it generated."""
    params = SamplingParams(temperature=temperature, seed=0, max_tokens=max_tokens, ignore_eos=temperature > 0)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)
    return time.perf_counter() - start, len(out[0].outputs[0].token_ids)


def spec_counts(llm: LLM) -> tuple[float, float]:
    metrics = llm.get_metrics()
    return metrics.get("vllm:spec_decode_num_drafts", 0), metrics.get("vllm:spec_decode_num_accepted_tokens", 0)


def main() -> None:
    args = parse_args()
    ngram = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
             "prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}
    # both engines alive, their runs interleaved, so drift on the machine hits both alike
    engines = {name: LLM(args.model, dtype=args.dtype, enable_prefix_caching=False, kv_cache_memory_bytes=512 << 20,
                         speculative_config=spec) for name, spec in (("plain", None), ("ngram", ngram))}
    vocab = engines["plain"].get_tokenizer().vocab_size
    workloads = (("copy", copy_prompt(engines["plain"]), 0.0), ("random", random_prompt(vocab), 1.0))
    print(f"\nsingle stream, {args.dtype}, {args.output_len} tokens out; ngram {ngram}")
    print("| workload | plain ITL ms | ngram ITL ms | ngram / plain | mean acceptance length | tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, prompt, temperature in workloads:
        best = {engine: {"first": float("inf"), "whole": float("inf")} for engine in engines}
        drafts_before, accepted_before = spec_counts(engines["ngram"])
        count = 0
        for _ in range(args.repeats):
            for engine, llm in engines.items():
                best[engine]["first"] = min(best[engine]["first"], run_time(llm, prompt, 1, temperature)[0])
                seconds, count = run_time(llm, prompt, args.output_len, temperature)
                best[engine]["whole"] = min(best[engine]["whole"], seconds)
        drafts, accepted = (a - b for a, b in zip(spec_counts(engines["ngram"]), (drafts_before, accepted_before)))
        itl = {engine: 1000 * (b["whole"] - b["first"]) / max(count - 1, 1) for engine, b in best.items()}
        accept = f"{1 + accepted / drafts:.2f}" if drafts else "-"
        print(f"| {name} | {itl['plain']:.2f} | {itl['ngram']:.2f} | {itl['ngram'] / itl['plain']:.2f} | {accept} | "
              f"{count} |")


if __name__ == "__main__":
    main()
