"""How close sluice's decode runs to this machine's own limits, all measured by this script.

    .venv/bin/python benchmarks/roofline.py            # default model, bf16

Machine limits (PyTorch, all threads):
- memory bandwidth: copying a 1 GiB tensor (bytes read + bytes written per second);
- bf16 compute: a 4096 x 4096 x 4096 matmul (torch.mm, oneDNN), and the same shape through
  sluice's own packed-weight kernel where the CPU has AVX-512 BF16.
Decode, through `sluice.LLM` with the prefix cache off (so every prompt is computed):
- single stream: one request, 32 prompt tokens, 128 out. Each step reads every weight once,
  so achieved bandwidth = weight bytes / step time;
- batch 32: 32 requests decoding together. FLOP per token = 2 x parameters (matmuls; attention
  over short contexts is small), so achieved compute = 32 x that / step time.
A step's time is (whole request - prefill-only request) / (output tokens - 1), as in
`sluice bench latency`.
"""

from __future__ import annotations

import argparse
import time

import torch

from sluice.bench.datasets import random_token_ids
from sluice.bench.offline import time_batch, time_generate


def best_of(fn, repeats: int) -> float:
    fn()  # warm: page faults, packing, thread start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth() -> float:
    """Bytes moved per second copying 1 GiB (read + write)."""
    src = torch.ones(1 << 29, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = best_of(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_flops() -> dict[str, float]:
    """bf16 FLOP/s of one large square matmul, through oneDNN and through sluice's kernel."""
    from sluice.layers import native

    n = 4096
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    flop = 2 * n**3
    result = {"torch_mm": flop / best_of(lambda: torch.mm(a, b), 3)}
    packed = native.pack_linear(b.t().contiguous())
    if packed is not None:
        result["sluice_kernel"] = flop / best_of(lambda: native.linear(a, packed, n), 3)
    return result


def decode_step_seconds(llm, batch: int, input_len: int, output_len: int, seed: int) -> float:
    """Per-step decode time for `batch` requests, prefill subtracted; the faster of two tries."""
    prefills, wholes = zip(*(time_batch(llm, batch, input_len, output_len, seed + 2 * i) for i in range(2)))
    return (min(wholes) - min(prefills)) / (output_len - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="folder, .gguf file or hub id (default: the default model)")
    p.add_argument("--output-len", type=int, default=128)
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bandwidth = memory_bandwidth()
    flops = matmul_flops()
    print(f"machine: memory copy {bandwidth / 1e9:.1f} GB/s; bf16 matmul 4096^3: "
          + ", ".join(f"{name} {value / 1e12:.3f} TFLOP/s" for name, value in flops.items()))

    from sluice import LLM

    llm = LLM(model=args.model, dtype="bfloat16", enable_prefix_caching=False, seed=0)
    model = llm.engine_core.executor.worker.runner.model
    # every matmul weight, packed or not: what one decode step reads, and 2 FLOP per token each
    matmul_params = sum(m.packed.numel() if getattr(m, "packed", None) is not None else m.weight.numel()
                        for m in model.modules() if isinstance(m, torch.nn.Linear))
    weight_bytes = 2 * matmul_params
    time_generate(llm, random_token_ids(llm.get_tokenizer(), 4, 32, 99), [8] * 4, use_tqdm=False)  # warm up

    one = decode_step_seconds(llm, 1, 32, args.output_len, seed=1)
    print(f"single stream: {1 / one:.1f} tok/s ({one * 1e3:.2f} ms/token); weights {weight_bytes / 2**20:.0f} MiB "
          f"-> {weight_bytes / one / 1e9:.1f} GB/s = {weight_bytes / one / bandwidth:.0%} of the copy bandwidth")
    step = decode_step_seconds(llm, 32, 32, args.output_len, seed=100)
    achieved = 32 * 2 * matmul_params / step
    best = max(flops.values())
    print(f"batch 32: {32 / step:.0f} tok/s ({step * 1e3:.1f} ms/step); {matmul_params / 1e6:.0f}M matmul weights -> "
          f"{achieved / 1e12:.3f} TFLOP/s = {achieved / best:.0%} of the best large matmul")


if __name__ == "__main__":
    main()
