"""Disaggregated prefill: what a decode engine saves by pulling a prompt's KV instead of computing it.

Two engines in this process (the default model, its default dtype), a producer and a consumer
(SluiceZmqConnector over loopback TCP). For each prompt length, --repeats rounds interleave:
- local: the consumer prefills a fresh prompt itself and samples one token;
- pulled: the producer prefills another fresh prompt (max_tokens=1, not timed), then the
  consumer pulls its KV and samples one token (only the last prompt token is computed).
Reported per length: the median time of each, their ratio, and the pulled KV's bytes / pull time
(the effective transfer rate, the pull being most of that step).

    python benchmarks/disagg_prefill.py
    python benchmarks/disagg_prefill.py --lengths 256 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import time

from sluice import LLM, SamplingParams
from sluice.platform import cpu_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: sluice's default model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="prompt lengths in tokens")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_token(kv_transfer_params: dict | None = None) -> SamplingParams:
    extra = None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}
    return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, extra_args=extra)


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> float:
    started = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    common = dict(model=args.model, dtype=args.dtype, max_model_len=max(args.lengths) + 16,
                  kv_cache_memory_bytes=512 << 20, enable_prefix_caching=False)
    producer = LLM(**common, kv_transfer_config={"kv_connector": "SluiceZmqConnector", "kv_role": "kv_producer",
                                                 "kv_port": free_port()})
    consumer = LLM(**common, kv_transfer_config={"kv_connector": "SluiceZmqConnector", "kv_role": "kv_consumer"})
    bytes_per_block = consumer.engine_core.executor.worker.runner.bytes_per_block()
    block_size = consumer.engine_core.config.cache.block_size
    fresh = itertools.count(1000)  # a new first token per prompt: no two prompts share KV
    print(f"CPU: {cpu_model()}; model {producer.engine_core.config.model.model}, "
          f"dtype {producer.engine_core.config.model.torch_dtype}")
    for length in args.lengths:
        timed(consumer, [next(fresh)] * length, one_token())  # warm-up at this length
        local, pulled = [], []
        for _ in range(args.repeats):
            local.append(timed(consumer, [next(fresh)] + list(range(1, length)), one_token()))
            prompt = [next(fresh)] + list(range(1, length))
            params = producer.generate([prompt], one_token({"do_remote_decode": True}), use_tqdm=False)[0]
            pulled.append(timed(consumer, prompt, one_token(params.kv_transfer_params)))
            producer.engine_core.step()  # frees the pulled blocks
        t_local, t_pulled = statistics.median(local), statistics.median(pulled)
        moved = -(-length // block_size) * bytes_per_block
        print(f"{length:5d} tokens: local prefill {t_local * 1e3:7.1f} ms, pulled {t_pulled * 1e3:7.1f} ms "
              f"({t_pulled / t_local:.2f}x), {moved / 2**20:.1f} MiB at {moved / t_pulled / 2**30:.2f} GiB/s")


if __name__ == "__main__":
    main()
