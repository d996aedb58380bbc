"""TTFT of a chat with one 448x448 image: cold, with the image's encoder output cached, and with
the whole prompt (image included) in the prefix cache.

    .venv/bin/python benchmarks/vision.py                       # LLaVA: ViT-L/14 + a 135M decoder, ~3-5 min
    .venv/bin/python benchmarks/vision.py --family qwen2_vl     # Qwen2-VL-2B's tower + a 135M decoder
    .venv/bin/python benchmarks/vision.py --shape tiny          # a smoke test (either family)

The model is random, in a real shape; timings do not depend on the weights' values.
- llava: LLaVA's CLIP ViT-L/14 tower (24 layers, hidden 1024) at 448x448 (1024 patches, so 1024
  image tokens) in front of a SmolLM2-135M-shaped Llama (30 layers, hidden 576).
- qwen2_vl: Qwen2-VL-2B's vision tower (32 blocks, width 1280, 14-pixel patches over 2 frames) at
  448x448 (1024 patches merged 2x2 into 256 image tokens) in front of a SmolLM2-135M-shaped Qwen2
  with M-RoPE (mrope_section 8/12/12 of its 32 rotary frequencies). Offline `LLM.chat` with max_tokens=1
over a data URL: the time covers decoding the image, the processor, the vision encoder, the prefill
and the first token. Each round runs the three cases back to back (interleaved, so load from other
processes hits them alike) and the best of --rounds is reported:

  cold         a picture never seen (new pixels: encoder cache and prefix cache miss)
  encoder hit  the previous picture after different text (encoder cache hit, prefill runs)
  prefix hit   the previous request again (its blocks, image included, come from the prefix cache)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for tests.multimodal

from tests.multimodal.tiny_llava import data_url, image_chat, make_image, save_tiny_llava  # noqa: E402
from tests.multimodal.tiny_qwen2_vl import save_tiny_qwen2_vl  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048)
TINY_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048)
QWEN2_VL_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14)  # 448x448 stays as it is
QWEN2_VL_SHAPES = {
    "real": dict(vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
                 text=dict(SMOLLM2_135M, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [8, 12, 12]}), **QWEN2_VL_PIXELS),
    "tiny": dict(vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
                 text=dict(TINY_DECODER, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [2, 3, 3]}), **QWEN2_VL_PIXELS),
}
SHAPES = {
    "real": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             projection_dim=768),
                 text=SMOLLM2_135M, image_size=448, patch_size=14),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=32),
                 text=TINY_DECODER, image_size=448, patch_size=14),
}


def ttft(llm, messages) -> float:
    from sluice.sampling_params import SamplingParams

    started = time.perf_counter()
    llm.chat(messages, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("llava", "qwen2_vl"), default="llava")
    parser.add_argument("--shape", choices=SHAPES, default="real")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import torch

    from sluice.entrypoints.llm import LLM

    with tempfile.TemporaryDirectory() as folder:
        if args.family == "llava":
            save_tiny_llava(folder, **SHAPES[args.shape], dtype=torch.bfloat16)
        else:
            save_tiny_qwen2_vl(folder, **QWEN2_VL_SHAPES[args.shape], dtype=torch.bfloat16)
        llm = LLM(folder, dtype=args.dtype, max_model_len=2048, max_num_batched_tokens=2048,
                  long_prefill_token_threshold=2048, kv_cache_memory_bytes=1 << 30)
        ttft(llm, image_chat("Warm-up.", data_url(make_image(0, (448, 448)))))
        times: dict[str, list[float]] = {"cold": [], "encoder hit": [], "prefix hit": []}
        for r in range(args.rounds):
            url = data_url(make_image(r + 1, (448, 448)))
            times["cold"].append(ttft(llm, image_chat("What is in this picture?", url)))
            times["encoder hit"].append(ttft(llm, image_chat(f"Round {r}: describe it.", url)))
            times["prefix hit"].append(ttft(llm, image_chat(f"Round {r}: describe it.", url)))
        metrics = llm.get_metrics()
    cold = min(times["cold"])
    print(f"{args.family}, shape {args.shape}, dtype {llm.config.model.torch_dtype}, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    for case, values in times.items():
        best = min(values)
        print(f"  {case:12s} TTFT {best * 1000:8.1f} ms  ({cold / best:5.1f}x faster than cold)  "
              f"runs: {', '.join(f'{v * 1000:.0f}' for v in values)} ms")
    print(f"  vllm:mm_cache_queries {metrics['vllm:mm_cache_queries']:.0f}, "
          f"vllm:mm_cache_hits {metrics['vllm:mm_cache_hits']:.0f}")


if __name__ == "__main__":
    main()
