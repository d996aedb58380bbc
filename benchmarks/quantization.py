"""Quantized weights against sluice's own bf16 path, all in one run on one machine, interleaved.

    .venv/bin/python benchmarks/quantization.py                       # everything (many minutes on 2 cores)
    .venv/bin/python benchmarks/quantization.py --num-prompts 0       # single stream only
    .venv/bin/python benchmarks/quantization.py --llama-cpp /tmp/llamacpp-venv/bin/python

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
llama.cpp (optional): --llama-cpp names the python of a virtualenv holding llama-cpp-python
(never a dependency of sluice); it runs in a subprocess on the same file with as many threads,
timed the same way (prompt alone, prompt + output), and its version and build features are printed.
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


LLAMA_CPP_SCRIPT = """
import json, sys, time
import llama_cpp
path, threads, output_len, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
llm.eval([1] + list(range(100, 131)))  # warm up
def run(tokens):
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(range(seed, seed + 32)))
    for i in range(tokens - 1):
        llm.eval([seed + 32 + i])
    return time.perf_counter() - start
prefill, whole = run(1), run(output_len)
print(json.dumps({"version": llama_cpp.__version__, "prefill_s": prefill, "whole_s": whole,
                  "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def llama_cpp_run(python: str, path: str, output_len: int, seed: int) -> dict:
    out = subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, path, str(torch.get_num_threads()), str(output_len),
                          str(seed)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-len", type=int, default=64, help="output tokens of the single-stream request")
    p.add_argument("--rounds", type=int, default=3, help="single-stream rounds (every method once per round)")
    p.add_argument("--num-prompts", type=int, default=128, help="W1 prompts (256 in, 128 out); 0 skips W1")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                   help="a python with llama-cpp-python installed: also time llama.cpp on the same file")
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
        timings: dict[str, list[tuple[float, float]]] = {m: [] for m in methods + ["llama.cpp"]}
        llama_info = None
        for rnd in range(args.rounds):
            seed = 11 + 2 * rnd
            for m in methods:
                timings[m].append(time_batch(llms[m], 1, 32, args.output_len, seed))
            if args.llama_cpp:
                llama_info = llama_cpp_run(args.llama_cpp, path, args.output_len, 1000 + 64 * rnd)
                timings["llama.cpp"].append((llama_info["prefill_s"], llama_info["whole_s"]))
            print(f"single-stream round {rnd + 1}: " + ", ".join(
                f"{m} {(w - p) / (args.output_len - 1) * 1e3:.1f} ms" for m, runs in timings.items() if runs
                for p, w in runs[-1:]), flush=True)
        for m, runs in timings.items():
            if runs and m in results:
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
        runs = timings["llama.cpp"]
        itl = min(w - p for p, w in runs) / (args.output_len - 1) * 1e3
        print(f"\nllama.cpp (llama-cpp-python {llama_info['version']}), same file, {torch.get_num_threads()} threads, "
              f"same rounds: ITL {itl:.2f} ms" + (f", {itl / base['itl_ms']:.2f}x of sluice bf16" if base else "")
              + "".join(f", sluice {m} / llama.cpp {results[m]['itl_ms'] / itl:.2f}x" for m in methods if m != "none"))
        print(f"llama.cpp build: {llama_info['system_info']}")


if __name__ == "__main__":
    main()
