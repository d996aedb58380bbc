"""Quantized weights against sluice's own bf16 path, all in one run on one machine, interleaved.

    .venv/bin/python benchmarks/quantization.py                       # everything (many minutes on 2 cores)
    .venv/bin/python benchmarks/quantization.py --num-prompts 0       # single stream only
    .venv/bin/python benchmarks/quantization.py --llama-bench /tmp/llama.cpp/build/bin/llama-bench

Machine limits, measured here: copy bandwidth (a 1 GiB tensor copy, bytes read + written per
second) and two int8 VNNI figures: the instruction peak (every thread running independent
vpdpbusd chains in registers, quant.c's vnni_peak_ops) and sluice's int8 kernel on a large
matmul (Q8_0 weights repacked at load, 256 x 4096 x 4096).

Each method of the default model (a Q4_1 GGUF): none (dequantized to bf16 at load: the
baseline), gguf (Q4_1 blocks, repacked at load), int8 (--quantization int8: W8A8, Q8_0 blocks made
at load) and gguf on a Q8_0 copy of the file written by this script. All engines are loaded at
once and measured in turns, so load changes on a shared machine hit every method alike:
- single stream: --rounds rounds; in each, every method (and llama.cpp, when asked) runs one
  request of 32 prompt tokens and --output-len out, and the same prompt with 1 out; ITL =
  (whole - prefill) / (output - 1), as `sluice bench latency` takes it, the best round kept;
  achieved bytes/s = resident weight bytes / ITL (each decode step reads every weight once),
  against the copy bandwidth;
- W1 throughput: --num-prompts x (256 in, 128 out), offline, output tokens/s, one method after
  the other, and the integer ops/s that makes (2 x linear weights x tokens / s) against the peaks;
- memory: resident weight bytes (every tensor the model holds) against the GGUF file's size.
llama.cpp (optional): --llama-bench names llama.cpp's `llama-bench` (never a dependency of sluice;
e.g. built from the llama.cpp that the llama-cpp-python sdist vendors, `cmake -DGGML_NATIVE=ON`,
target llama-bench). It runs on the same file with as many threads in every round, timed the same
way (prompt alone, prompt + output), and its build is printed.
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


def vnni_peaks() -> dict[str, float]:
    """Integer ops/s (2 per multiply-add): the instruction peak, and the int8 kernel on a large matmul."""
    from sluice.layers import native
    from sluice.quantization.gguf import Q, gguf_linear, kernel_available, repack
    from sluice.quantization.int8 import quantize_q8_0

    lib = native.load_library()
    if lib is None or not kernel_available():
        return {}
    iters = 1 << 22
    peaks = {"instruction": lib.vnni_peak_ops(iters) / best_of(lambda: lib.vnni_peak_ops(iters), 3)}
    m, n, k = 256, 4096, 4096
    blocks = repack(quantize_q8_0(torch.randn(n, k)), Q.Q8_0)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    peaks["kernel"] = 2 * m * n * k / best_of(lambda: gguf_linear(x, blocks, Q.Q8_0, n), 3)
    return peaks


def resident_weight_bytes(llm) -> int:
    from sluice.worker.sleep import model_tensors

    model = llm.engine_core.executor.worker.runner.model
    return sum(t.numel() * t.element_size() for _, _, t in model_tensors(model))


def linear_weights(llm) -> int:
    """Multiply-adds per token of the model's linear layers."""
    from sluice.layers.linear import Linear

    model = llm.engine_core.executor.worker.runner.model
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear))


def load(method: str, model: str):
    from sluice import LLM

    quantization = "gguf" if method == "gguf-q8_0" else method
    llm = LLM(model=model, quantization=quantization, dtype="bfloat16", enable_prefix_caching=False,
              max_model_len=1024, seed=0, kv_cache_memory_bytes=1200 << 20)
    time_generate(llm, random_token_ids(llm.get_tokenizer(), 4, 32, 99), [8] * 4, use_tqdm=False)  # warm up
    return llm


def w1(llm, num_prompts: int) -> tuple[float, int]:
    """(seconds, prompt + output tokens) of --num-prompts x (256 in, 128 out)."""
    prompts = random_token_ids(llm.get_tokenizer(), num_prompts, 256, 1000)
    run = time_generate(llm, prompts, [128] * num_prompts, use_tqdm=False)
    return run.elapsed, run.input_tokens + run.output_tokens


def llama_bench_run(binary: str, path: str, output_len: int, threads: int) -> dict:
    """llama.cpp's own benchmark on the same file: a 32-token prompt (pp32), then the same prompt and
    output_len tokens generated one by one (pg32,output_len); ITL = the difference / output_len."""
    out = subprocess.run([binary, "-m", path, "-t", str(threads), "-p", "32", "-n", "0", "-pg", f"32,{output_len}",
                          "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    runs = json.loads(out.stdout)
    prefill = next(r for r in runs if r["n_gen"] == 0)["avg_ns"] / 1e9
    whole = next(r for r in runs if r["n_gen"] == output_len)["avg_ns"] / 1e9
    first = runs[0]
    return {"prefill_s": prefill, "whole_s": whole, "itl_ms": (whole - prefill) / output_len * 1e3,
            "build": f"llama.cpp {first.get('build_commit')} (build {first.get('build_number')}), "
                     f"backend {first.get('backends', first.get('backend'))}, cpu {first.get('cpu_info')}, "
                     f"type {first.get('model_type')}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-len", type=int, default=64, help="output tokens of the single-stream request")
    p.add_argument("--rounds", type=int, default=3, help="single-stream rounds (every method once per round)")
    p.add_argument("--num-prompts", type=int, default=128, help="W1 prompts (256 in, 128 out); 0 skips W1")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench binary: also time llama.cpp on the same file, in the same rounds")
    args = p.parse_args()

    from sluice.loader import resolve_model

    path = resolve_model(None).path
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {os.path.basename(path)} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    bandwidth, peaks = memory_bandwidth(), vnni_peaks()
    print(f"machine: copy bandwidth {bandwidth / 1e9:.1f} GB/s; int8 VNNI peak: "
          + (", ".join(f"{name} {ops / 1e12:.3f} TOPS" for name, ops in peaks.items()) or "n/a (no VNNI kernel here)"))

    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        models, llms = {}, {}
        for method in methods:
            models[method] = path
            if method == "gguf-q8_0":
                models[method] = os.path.join(tmp, "SmolLM2-135M-Instruct.Q8_0.gguf")
                requantize_file(path, models[method], gguf.GGMLQuantizationType.Q8_0)
            llms[method] = load(method, models[method])
            print(f"loaded {method}", flush=True)
        results = {m: {"method": m, "weight_bytes": resident_weight_bytes(llms[m]), "file_bytes":
                       os.path.getsize(models[m]), "linear_weights": linear_weights(llms[m])} for m in methods}
        timings: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        llama_info, llama_itls = None, []
        for rnd in range(args.rounds):
            seed = 11 + 2 * rnd
            for m in methods:
                timings[m].append(time_batch(llms[m], 1, 32, args.output_len, seed))
            if args.llama_bench:
                llama_info = llama_bench_run(args.llama_bench, path, args.output_len, torch.get_num_threads())
                llama_itls.append(llama_info["itl_ms"])
            print(f"single-stream round {rnd + 1}: " + ", ".join(
                f"{m} {(w - p) / (args.output_len - 1) * 1e3:.1f} ms" for m, runs in timings.items()
                for p, w in runs[-1:]) + (f", llama.cpp {llama_itls[-1]:.1f} ms" if llama_itls else ""), flush=True)
        for m, runs in timings.items():
            results[m]["itl_ms"] = min(w - p for p, w in runs) / (args.output_len - 1) * 1e3
        if args.num_prompts:
            for m in methods:
                seconds, tokens = w1(llms[m], args.num_prompts)
                results[m]["w1_output_tok_s"] = args.num_prompts * 128 / seconds
                results[m]["w1_int_ops_s"] = 2 * results[m]["linear_weights"] * tokens / seconds
                print(f"W1 {m}: {results[m]['w1_output_tok_s']:.1f} output tok/s", flush=True)
        for m in methods:
            print(json.dumps(results[m]))
        del llms
        gc.collect()

    base = results.get("none")
    peak = peaks.get("instruction")
    print("\n| method | ITL ms | vs bf16 | GB/s (of copy bw) | W1 out tok/s | vs bf16 | int OPS (of VNNI peak) "
          "| weights MiB | / file |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        rate = r["weight_bytes"] / (r["itl_ms"] / 1e3)
        w1_rate = r.get("w1_output_tok_s")
        row = [r["method"], f"{r['itl_ms']:.2f}", f"{r['itl_ms'] / base['itl_ms']:.2f}x" if base else "-",
               f"{rate / 1e9:.2f} ({rate / bandwidth:.0%})", f"{w1_rate:.1f}" if w1_rate else "-",
               f"{w1_rate / base['w1_output_tok_s']:.2f}x" if w1_rate and base and base.get("w1_output_tok_s") else "-",
               f"{r['w1_int_ops_s'] / 1e12:.3f}T ({r['w1_int_ops_s'] / peak:.0%})" if w1_rate and peak else "-",
               f"{r['weight_bytes'] / 2**20:.1f}", f"{r['weight_bytes'] / r['file_bytes']:.2f}"]
        print("| " + " | ".join(row) + " |")
    if llama_info:
        itl = min(llama_itls)
        print(f"\nllama.cpp (llama-bench), same file, {torch.get_num_threads()} threads, same rounds: ITL {itl:.2f} ms"
              + (f", {itl / base['itl_ms']:.2f}x of sluice bf16" if base else "")
              + "".join(f", sluice {m} / llama.cpp {results[m]['itl_ms'] / itl:.2f}x" for m in methods if m != "none"))
        print(f"build: {llama_info['build']}")

if __name__ == "__main__":
    main()
