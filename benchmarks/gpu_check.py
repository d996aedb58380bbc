"""The CUDA path on one GPU: greedy parity with transformers, then throughput against it.

    python benchmarks/gpu_check.py --tokenizer DIR [--num-prompts 128 --input-len 256 --output-len 128]

DIR holds a Hugging Face tokenizer and config.json (e.g. the default model's GGUF sidecar under
~/.cache/sluice/gguf). The weights are random, in that config's shape, so no checkpoint has to
travel to the GPU machine; the work per token is the real model's. Each section reports on its
own, so one failing part does not hide the others.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import traceback

import torch

DEVICE = "cuda"


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== {name}", flush=True)
            try:
                return fn(*args, **kwargs)
            except Exception:
                traceback.print_exc()
                print(f"=== {name}: FAILED", flush=True)
                return None
        return run
    return wrap


def make_model(tokenizer_dir: str, dtype: torch.dtype, layers: int | None = None) -> str:
    """A random-weight checkpoint in the tokenizer folder's config shape."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(tokenizer_dir)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    folder = tempfile.mkdtemp(prefix="sluice-gpu-model-")
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (num, length), generator=g).tolist()


def hf_generate(model, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Equal-length prompts only (no padding), greedy, exactly new_tokens each."""
    ids = torch.tensor(batch, device=DEVICE)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


@section("parity: sluice vs transformers, float32, greedy")
def parity(tokenizer_dir: str) -> None:
    import transformers

    from sluice import LLM, SamplingParams

    folder = make_model(tokenizer_dir, torch.float32, layers=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE).eval()
    prompts = [random_prompts(1, n, hf.config.vocab_size, seed=n)[0] for n in (5, 17, 33, 64)]
    llm = LLM(folder, dtype="float32", device=DEVICE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    matches = 0
    for prompt, out in zip(prompts, outs):
        expected = hf_generate(hf, [prompt], 24)[0]
        got = list(out.outputs[0].token_ids)
        same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), len(expected))
        print(f"prompt {len(prompt):3d} tokens: first {same}/24 tokens equal")
        matches += same == 24
    seeded = llm.generate([{"prompt_token_ids": prompts[0]}] * 2,
                          SamplingParams(temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)
    print(f"seeded sampling reproducible: {seeded[0].outputs[0].token_ids == seeded[1].outputs[0].token_ids}")
    print(f"=== parity: {matches}/{len(prompts)} prompts token for token")


@section("throughput: sluice vs transformers generate, bfloat16")
def throughput(tokenizer_dir: str, num_prompts: int, input_len: int, output_len: int) -> None:
    import transformers

    from sluice import LLM, SamplingParams

    folder = make_model(tokenizer_dir, torch.bfloat16)
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    prompts = random_prompts(num_prompts, input_len, vocab, seed=0)
    llm = LLM(folder, dtype="bfloat16", device=DEVICE)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4), use_tqdm=False)
    sync()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sluice_s = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"sluice: {tokens} tokens in {sluice_s:.2f} s = {tokens / sluice_s:.0f} output tok/s")

    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], params, use_tqdm=False)
    single_ms = (time.perf_counter() - start) * 1000 / output_len
    print(f"sluice batch 1: {single_ms:.2f} ms per output token")
    profile_decode(llm, prompts, output_len)
    del llm

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()
    hf_generate(hf, prompts[:2], 4)
    sync()
    start = time.perf_counter()
    hf_tokens = sum(len(row) for row in hf_generate(hf, prompts, output_len))
    hf_s = time.perf_counter() - start
    print(f"transformers batch {num_prompts}: {hf_tokens} tokens in {hf_s:.2f} s = {hf_tokens / hf_s:.0f} output tok/s")
    start = time.perf_counter()
    hf_generate(hf, [prompts[0][:32]], output_len)
    hf_single_ms = (time.perf_counter() - start) * 1000 / output_len
    print(f"transformers batch 1: {hf_single_ms:.2f} ms per output token")
    print(f"=== throughput ratio sluice/transformers: {(tokens / sluice_s) / (hf_tokens / hf_s):.2f}x; "
          f"batch-1 latency ratio transformers/sluice: {hf_single_ms / single_ms:.2f}x")


def profile_decode(llm, prompts: list[list[int]], output_len: int) -> None:
    """Where a batched step's time goes: host work against CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    from sluice import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])) as prof:
        llm.generate([{"prompt_token_ids": p[:64]} for p in prompts[:64]], params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with a HF tokenizer and config.json")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--device", default="cuda", help="cpu runs the same checks here (slowly)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU path")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}")
    parity(args.tokenizer)
    throughput(args.tokenizer, args.num_prompts, args.input_len, args.output_len)


if __name__ == "__main__":
    main()
