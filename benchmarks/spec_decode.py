"""Single-stream speculative decoding: inter-token latency with and without n-gram drafts.

Two workloads on one model, both engines built in this process one after the other:
- copy: "rewrite this code with one change", the code being a file of this repository, so the
  answer repeats its input and drafts from the context are often right;
- random: prompts of random token ids (nothing to copy; speculation must get out of the way).

ITL = (time for the whole answer - time for its first token) / (tokens - 1), each the best of
--repeats runs, greedy. Prints a table with the ratio speculative / plain and the mean acceptance
length (tokens per verification: kept drafts + 1).

    python benchmarks/spec_decode.py                      # the default model, bf16
    python benchmarks/spec_decode.py --num-speculative-tokens 3 --prompt-lookup-max 2
"""

from __future__ import annotations

import argparse
import gc
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
    ids = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    return {"prompt_token_ids": list(ids)}


def random_prompt(vocab_size: int, length: int = 256) -> dict:
    rng = random.Random(0)
    return {"prompt_token_ids": [rng.randrange(100, vocab_size) for _ in range(length)]}


def itl(llm: LLM, prompt: dict, output_len: int, repeats: int, ignore_eos: bool) -> tuple[float, int]:
    """Seconds per output token after the first, and the tokens generated."""
    def best(max_tokens: int) -> tuple[float, int]:
        times, count = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                        ignore_eos=ignore_eos), use_tqdm=False)
            times.append(time.perf_counter() - start)
            count = len(out[0].outputs[0].token_ids)
        return min(times), count

    first, _ = best(1)
    whole, count = best(output_len)
    return (whole - first) / max(count - 1, 1), count


def measure(args: argparse.Namespace, speculative: dict | None) -> dict:
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False, speculative_config=speculative)
    vocab = llm.get_tokenizer().vocab_size
    result = {}
    for name, prompt, ignore_eos in (("copy", copy_prompt(llm), False), ("random", random_prompt(vocab), True)):
        before = llm.get_metrics()
        seconds, count = itl(llm, prompt, args.output_len, args.repeats, ignore_eos)
        after = llm.get_metrics()
        drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
        accepted = (after.get("vllm:spec_decode_num_accepted_tokens", 0)
                    - before.get("vllm:spec_decode_num_accepted_tokens", 0))
        result[name] = {"itl_ms": 1000 * seconds, "tokens": count,
                        "acceptance_length": 1 + accepted / drafts if drafts else None}
    del llm
    gc.collect()
    return result


def main() -> None:
    args = parse_args()
    ngram = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
             "prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}
    plain = measure(args, None)
    spec = measure(args, ngram)
    print(f"\nsingle stream, {args.dtype}, greedy, {args.output_len} tokens out; ngram {ngram}")
    print("| workload | plain ITL ms | ngram ITL ms | ngram / plain | mean acceptance length | tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("copy", "random"):
        p, s = plain[name], spec[name]
        accept = f"{s['acceptance_length']:.2f}" if s["acceptance_length"] else "-"
        print(f"| {name} | {p['itl_ms']:.2f} | {s['itl_ms']:.2f} | {s['itl_ms'] / p['itl_ms']:.2f} | {accept} | "
              f"{s['tokens']} |")


if __name__ == "__main__":
    main()
