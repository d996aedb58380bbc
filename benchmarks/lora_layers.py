"""What the LoRA delta adds to one decoder layer's linear layers, without a server around it.

The four projections of a decoder layer of the default model's shape (SmolLM2-135M: qkv, o,
gate/up with its activation, down with its residual add), bf16, on the path the engine picks
(packed native kernel where it runs), timed bare and with --num-adapters adapters of rank --rank
on every projection: rows spread round-robin over the adapters (a mixed decode step), and one
row of one adapter (single-stream decode). Both sides are interleaved; the best of --repeats.

    python benchmarks/lora_layers.py
    python benchmarks/lora_layers.py --rows 8 --num-adapters 4 --rank 16
"""

from __future__ import annotations

import argparse
import time

import torch

from sluice.layers.linear import GateUpLinear, Linear, QKVLinear
from sluice.lora.adapter import LoRAWeights
from sluice.lora.layers import LoRALayer, LoRAStep


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=200)
    return p.parse_args()


def decoder_layer(args: argparse.Namespace) -> dict[str, Linear]:
    head_dim = args.hidden // args.heads
    layers = {"qkv": QKVLinear(args.hidden, args.heads, args.kv_heads, head_dim),
              "o": Linear(args.hidden, args.hidden, bias=False),
              "gate_up": GateUpLinear(args.hidden, args.intermediate),
              "down": Linear(args.intermediate, args.hidden, bias=False)}
    for layer in layers.values():
        layer.to(torch.bfloat16).requires_grad_(False)
        layer.pack(drop_weight=True)
    return layers


def hook(layers: dict[str, Linear], step: LoRAStep, args: argparse.Namespace) -> None:
    """Every adapter on every shard of every projection, random weights."""
    for layer in layers.values():
        shards = [(layer.shard_offsets[s], n) for s, n in layer.shard_sizes.items()] \
            if hasattr(layer, "shard_sizes") else [(0, layer.out_features)]
        layer.lora = LoRALayer(shards, len(shards) * args.rank, layer.in_features, layer.out_features,
                               args.num_adapters, torch.bfloat16, torch.device("cpu"), step,
                               panel_order=isinstance(layer, GateUpLinear) and layer.packed is not None)
        for slot in range(args.num_adapters):
            layer.lora.set_slot(slot, [LoRAWeights(torch.randn(args.rank, layer.in_features).bfloat16() * 0.05,
                                                   torch.randn(size, args.rank).bfloat16() * 0.05)
                                       for _, size in shards])


def forward(layers: dict[str, Linear], x: torch.Tensor, x_inter: torch.Tensor) -> None:
    layers["qkv"](x)
    layers["o"](x, residual=x)
    layers["gate_up"].silu_and_mul(x)
    layers["down"](x_inter, residual=x)


def timed(layers, x, x_inter, step: LoRAStep, row_slots: list[int] | None) -> float:
    step.set(row_slots)
    start = time.perf_counter()
    forward(layers, x, x_inter)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    layers = decoder_layer(args)
    step = LoRAStep(args.num_adapters, torch.bfloat16, torch.device("cpu"))
    hook(layers, step, args)
    cases = {f"{args.rows} rows over {args.num_adapters} adapters": (args.rows, [i % args.num_adapters
                                                                              for i in range(args.rows)]),
             "1 row, 1 adapter": (1, [0])}
    print(f"CPU threads {torch.get_num_threads()}; one decoder layer's projections, bf16, rank {args.rank}")
    with torch.inference_mode():
        for label, (rows, slots) in cases.items():
            x = torch.randn(rows, args.hidden).bfloat16()
            x_inter = torch.randn(rows, args.intermediate).bfloat16()
            best = {"base": float("inf"), "lora": float("inf")}
            for _ in range(args.repeats):  # interleaved: the machine may be shared
                best["base"] = min(best["base"], timed(layers, x, x_inter, step, None))
                best["lora"] = min(best["lora"], timed(layers, x, x_inter, step, slots))
            print(f"{label:32} base {best['base'] * 1e6:8.1f} us  LoRA {best['lora'] * 1e6:8.1f} us  "
                  f"ratio {best['lora'] / best['base']:.2f}")


if __name__ == "__main__":
    main()
