"""Single-stream speculative decoding: inter-token latency with and without drafts.

Two workloads on one model, both engines built in this process one after the other:
- copy: "rewrite this code with one change", the code being a file of this repository, so the
  answer repeats its input and drafts from the context are often right;
- random: prompts of random token ids, sampled at temperature 1 with a fixed seed (nothing to
  copy; greedy output of a random prompt soon loops, which n-grams would predict).

ITL = (time for the whole answer - time for its first token) / (tokens - 1), each the best of
--repeats runs; copy is greedy. Prints a table with the ratio speculative / plain and the mean acceptance
length (tokens per verification: kept drafts + 1).

    python benchmarks/spec_decode.py                      # the default model, bf16, n-gram drafts
    python benchmarks/spec_decode.py --num-speculative-tokens 3 --prompt-lookup-max 2
    # the default model drafting for a random-weight target of SmolLM2-1.7B's shape (built once
    # under sluice's cache folder, bench/; its output is noise, so this measures what unpaid drafts cost)
    python benchmarks/spec_decode.py --method draft_model --random-target 1.7b --output-len 64 --repeats 2
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from sluice import LLM, SamplingParams
from sluice.loader import resolve_model
from sluice.platform import cache_dir

CODE_FILE = Path(__file__).resolve().parents[1] / "sluice" / "spec_decode" / "ngram.py"
# SmolLM2's larger siblings (their config.json values): same tokenizer as the default model
TARGET_SHAPES = {
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the target; default: the default model")
    p.add_argument("--method", default="ngram", choices=["ngram", "draft_model"])
    p.add_argument("--draft-model", default=None, help="for draft_model; default: the default model")
    p.add_argument("--random-target", choices=sorted(TARGET_SHAPES),
                   help="target: a random-weight model of this SmolLM2 shape, in place of --model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--prompt-lookup-max", type=int, default=3)
    p.add_argument("--output-len", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def random_target(shape: str) -> str:
    """A bf16 safetensors folder of random weights in this shape (built once and kept)."""
    import safetensors.torch
    import transformers

    folder = Path(cache_dir("bench", f"random-smollm2-{shape}"))
    if (folder / "model.safetensors").exists():
        return str(folder)
    config = transformers.LlamaConfig(**TARGET_SHAPES[shape], vocab_size=49152, max_position_embeddings=8192,
                                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                      architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in transformers.LlamaForCausalLM(config).state_dict().items()
                  if name != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    tensors = {name: (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02)
               .to(torch.bfloat16) for name, shape in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


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
    if args.method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
                "prompt_lookup_min": args.prompt_lookup_min, "prompt_lookup_max": args.prompt_lookup_max}
    else:
        spec = {"method": "draft_model", "model": args.draft_model or resolve_model(None).path,
                "num_speculative_tokens": args.num_speculative_tokens}
    model = random_target(args.random_target) if args.random_target else args.model
    tokenizer = resolve_model(None).path if args.random_target else None
    # both engines alive, their runs interleaved, so drift on the machine hits both alike
    engines = {name: LLM(model, tokenizer=tokenizer, dtype=args.dtype, enable_prefix_caching=False,
                         kv_cache_memory_bytes=512 << 20, speculative_config=config)
               for name, config in (("plain", None), ("spec", spec))}
    vocab = engines["plain"].get_tokenizer().vocab_size
    workloads = (("copy", copy_prompt(engines["plain"]), 0.0), ("random", random_prompt(vocab), 1.0))
    print(f"\nsingle stream, {args.dtype}, {args.output_len} tokens out; target {model or 'the default model'}; "
          f"speculative_config {spec}")
    print("| workload | plain ITL ms | spec ITL ms | spec / plain | mean acceptance length | tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, prompt, temperature in workloads:
        best = {engine: {"first": float("inf"), "whole": float("inf")} for engine in engines}
        drafts_before, accepted_before = spec_counts(engines["spec"])
        count = 0
        for _ in range(args.repeats):
            for engine, llm in engines.items():
                best[engine]["first"] = min(best[engine]["first"], run_time(llm, prompt, 1, temperature)[0])
                seconds, count = run_time(llm, prompt, args.output_len, temperature)
                best[engine]["whole"] = min(best[engine]["whole"], seconds)
        drafts, accepted = (a - b for a, b in zip(spec_counts(engines["spec"]), (drafts_before, accepted_before)))
        itl = {engine: 1000 * (b["whole"] - b["first"]) / max(count - 1, 1) for engine, b in best.items()}
        accept = f"{1 + accepted / drafts:.2f}" if drafts else "-"
        print(f"| {name} | {itl['plain']:.2f} | {itl['spec']:.2f} | {itl['spec'] / itl['plain']:.2f} | {accept} | "
              f"{count} |")


if __name__ == "__main__":
    main()
