"""Quantized weights against sluice's own bf16 path, all in one run on one machine.

    .venv/bin/python benchmarks/quantization.py                       # everything (minutes on 2 cores)
    .venv/bin/python benchmarks/quantization.py --num-prompts 16      # a shorter W1
    .venv/bin/python benchmarks/quantization.py --llama-cpp-python /tmp/llcpp/bin/python

Machine limits, measured here: copy bandwidth (a 1 GiB tensor copy, bytes read + written per
second) and an int8 VNNI peak (sluice's W8A8 kernel on a 256 x 4096 x 4096 matmul, integer ops/s).

Each method of the default model (a Q4_1 GGUF): none (dequantized to bf16 at load: the
baseline), gguf (Q4_1 blocks as stored), int8 (W8A8, quantized at load), and gguf on a Q8_0 copy
of the file written by this script:
- single stream: one request, 32 prompt tokens, --output-len out; ITL = (whole - prefill) /
  (output - 1) as `sluice bench latency` takes it; achieved bytes/s = resident weight bytes / ITL
  (each decode step reads every weight once), against the copy bandwidth;
- W1 throughput: --num-prompts x (256 in, 128 out), offline, output tokens/s, and the integer
  ops/s that makes (2 x linear weights x tokens / s) against the VNNI peak;
- memory: resident weight bytes (every tensor the model holds) against the GGUF file's size.
llama.cpp (optional): --llama-cpp-python names the python of a virtualenv holding
llama-cpp-python (`python -m venv /tmp/llcpp && /tmp/llcpp/bin/pip install llama-cpp-python`);
its single-stream ITL on the same file is measured the same way, with as many threads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile

import gguf
import torch

from sluice.bench.datasets import random_token_ids
from sluice.bench.offline import time_batch, time_generate
from sluice.quantization.gguf import requantize_file

from roofline import best_of, memory_bandwidth  # benchmarks/ is on sys.path when run as a script

METHODS = ("none", "gguf", "int8", "gguf-q8_0")


def vnni_peak() -> float | None:
    """Integer ops/s (2 per multiply-add) of the W8A8 kernel on a large matmul; None without it."""
    from sluice.layers.linear import Linear
    from sluice.quantization.int8 import ChannelInt8Method, kernel_available, quantize_per_channel

    if not kernel_available():
        return None
    m, n, k = 256, 4096, 4096
    layer = Linear(k, n, bias=False).to(torch.bfloat16)
    layer.quant_method = ChannelInt8Method()
    layer.quant_method.set_weights(layer, *quantize_per_channel(layer.weight.detach()))
    x = torch.randn(m, k, dtype=torch.bfloat16)
    with torch.inference_mode():
        return 2 * m * n * k / best_of(lambda: layer(x), 5)


def resident_weight_bytes(llm) -> int:
    from sluice.worker.sleep import model_tensors

    model = llm.engine_core.executor.worker.runner.model
    return sum(t.numel() * t.element_size() for _, _, t in model_tensors(model))


def linear_weights(llm) -> int:
    """Multiply-adds per token of the model's linear layers."""
    from sluice.layers.linear import Linear

    model = llm.engine_core.executor.worker.runner.model
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear))


def single_stream_itl(llm, output_len: int) -> float:
    prefills, wholes = zip(*(time_batch(llm, 1, 32, output_len, 11 + 2 * i) for i in range(3)))
    return (min(wholes) - min(prefills)) / (output_len - 1)


def run_method(method: str, model: str, args: argparse.Namespace) -> dict:
    from sluice import LLM

    quantization = "gguf" if method == "gguf-q8_0" else method
    llm = LLM(model=model, quantization=quantization, dtype="bfloat16", enable_prefix_caching=False,
              max_model_len=1024, seed=0)
    tokenizer = llm.get_tokenizer()
    time_generate(llm, random_token_ids(tokenizer, 4, 32, 99), [8] * 4, use_tqdm=False)  # warm up
    itl = single_stream_itl(llm, args.output_len)
    result = {"method": method, "itl_ms": itl * 1e3, "weight_bytes": resident_weight_bytes(llm),
              "linear_weights": linear_weights(llm)}
    if args.num_prompts:
        prompts = random_token_ids(tokenizer, args.num_prompts, 256, 1000)
        run = time_generate(llm, prompts, [128] * args.num_prompts, use_tqdm=False)
        result["w1_output_tok_s"] = run.output_tokens / run.elapsed
        result["w1_int_ops_s"] = 2 * result["linear_weights"] * (run.input_tokens + run.output_tokens) / run.elapsed
    del llm
    gc.collect()
    return result


LLAMA_CPP_SCRIPT = """
import json, sys, time
from llama_cpp import Llama, __version__
path, threads, output_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
best = float("inf")
for attempt in range(3):
    llm.reset()
    llm.eval(list(range(100 + attempt, 132 + attempt)))
    start = time.perf_counter()
    for i in range(output_len - 1):
        llm.eval([200 + i])
    best = min(best, (time.perf_counter() - start) / (output_len - 1))
print(json.dumps({"version": __version__, "itl_ms": best * 1e3}))
"""


def llama_cpp_itl(python: str, path: str, output_len: int) -> dict:
    out = subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, path, str(torch.get_num_threads()), str(output_len)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-len", type=int, default=64, help="output tokens of the single-stream request")
    p.add_argument("--num-prompts", type=int, default=128, help="W1 prompts (256 in, 128 out); 0 skips W1")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                   help="a python with llama-cpp-python installed: also time llama.cpp on the same file")
    args = p.parse_args()

    from sluice.loader import resolve_model

    path = resolve_model(None).path
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {os.path.basename(path)} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    bandwidth, peak = memory_bandwidth(), vnni_peak()
    print(f"machine: copy bandwidth {bandwidth / 1e9:.1f} GB/s; int8 VNNI peak "
          + (f"{peak / 1e12:.2f} TOPS" if peak else "n/a (no VNNI kernel here)"))

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            model = path
            if method == "gguf-q8_0":
                model = os.path.join(tmp, "SmolLM2-135M-Instruct.Q8_0.gguf")
                requantize_file(path, model, gguf.GGMLQuantizationType.Q8_0)
            result = run_method(method, model, args)
            result["file_bytes"] = os.path.getsize(model)
            results.append(result)
            print(json.dumps(result))

    base = next((r for r in results if r["method"] == "none"), None)
    print("\n| method | ITL ms | vs bf16 | GB/s (of copy bw) | W1 out tok/s | vs bf16 | int OPS (of VNNI peak) "
          "| weights MiB | / file |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r["weight_bytes"] / (r["itl_ms"] / 1e3)
        w1 = r.get("w1_output_tok_s")
        row = [r["method"], f"{r['itl_ms']:.2f}", f"{r['itl_ms'] / base['itl_ms']:.2f}x" if base else "-",
               f"{rate / 1e9:.1f} ({rate / bandwidth:.0%})", f"{w1:.1f}" if w1 else "-",
               f"{w1 / base['w1_output_tok_s']:.2f}x" if w1 and base and base.get("w1_output_tok_s") else "-",
               f"{r['w1_int_ops_s'] / 1e12:.3f}T ({r['w1_int_ops_s'] / peak:.0%})" if w1 and peak else "-",
               f"{r['weight_bytes'] / 2**20:.1f}", f"{r['weight_bytes'] / r['file_bytes']:.2f}"]
        print("| " + " | ".join(row) + " |")
    if args.llama_cpp_python:
        found = llama_cpp_itl(args.llama_cpp_python, path, args.output_len)
        print(f"\nllama.cpp (llama-cpp-python {found['version']}), same file, {torch.get_num_threads()} threads: "
              f"ITL {found['itl_ms']:.2f} ms")


if __name__ == "__main__":
    main()
