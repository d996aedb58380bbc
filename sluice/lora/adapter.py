"""A PEFT LoRA adapter read from disk: per target module, A [r, in] and B [out, r] with the
scaling folded into B (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA).

Only what the engine computes exactly is accepted; anything else (DoRA, LoRA biases, extra
trained modules, a rank over max_lora_rank, a module the engine cannot hook) is refused with a
message naming it, before any request uses the adapter.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# the projections of a decoder layer a LoRA may target: q/k/v and gate/up land on shards of the
# fused qkv_proj / gate_up_proj; checkpoints that store those fused (Phi-3) target them whole
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj")


class LoRAError(ValueError):
    """An adapter the engine refuses; the message names the field, module or limit."""


@dataclass
class LoRAWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r], scaled

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class LoRAModel:
    """An adapter in memory: checkpoint module path (model.layers.0.self_attn.q_proj) -> weights."""

    adapter_id: int
    rank: int
    modules: dict[str, LoRAWeights]


def read_config(path: str, max_lora_rank: int) -> dict:
    """adapter_config.json, checked for what the engine computes."""
    if not os.path.isdir(path):
        raise LoRAError(f"lora_path {path!r} is not a directory")
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise LoRAError(f"lora_path {path!r}: cannot read {CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise LoRAError(f"lora_path {path!r}: {CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    refusals = [
        (peft_type != "LORA", f"peft_type={peft_type!r} (only LORA)"),
        (bool(config.get("use_dora")), "use_dora=true (DoRA)"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} (only 'none')"),
        (bool(config.get("modules_to_save")), f"modules_to_save={config.get('modules_to_save')!r}"),
        (bool(config.get("alpha_pattern")), "alpha_pattern (per-module alphas)"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out=true"),
    ]
    for refused, what in refusals:
        if refused:
            raise LoRAError(f"lora_path {path!r}: {CONFIG_FILE} has {what}, which sluice does not support")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise LoRAError(f"lora_path {path!r}: {CONFIG_FILE} needs an int r >= 1 and a number lora_alpha; "
                        f"got r={rank!r}, lora_alpha={alpha!r}")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        raise LoRAError(f"lora_path {path!r}: LoRA rank {max(ranks)} is over max_lora_rank={max_lora_rank} "
                        "(--max-lora-rank)")
    return config


def load_adapter(path: str, adapter_id: int, max_lora_rank: int, dtype: torch.dtype) -> LoRAModel:
    """Read and check a PEFT adapter folder; A and B in `dtype`, the scaling folded into B."""
    config = read_config(path, max_lora_rank)
    try:
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (OSError, ValueError, RuntimeError) as exc:
        raise LoRAError(f"lora_path {path!r}: cannot read {WEIGHTS_FILE}: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, kind = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise LoRAError(f"lora_path {path!r}: tensor {name!r} is not a LoRA A/B weight; only "
                            f"{', '.join(TARGET_MODULES)} may be trained")
        if module.rpartition(".")[2] not in TARGET_MODULES:
            raise LoRAError(f"lora_path {path!r}: target module {module!r} is not supported; supported: "
                            f"{', '.join(TARGET_MODULES)}")
        pairs.setdefault(module, {})[kind[0]] = tensor
    modules = {module: _weights(path, module, pair, config, max_lora_rank, dtype) for module, pair in pairs.items()}
    if not modules:
        raise LoRAError(f"lora_path {path!r}: {WEIGHTS_FILE} holds no LoRA weights")
    return LoRAModel(adapter_id, max(w.rank for w in modules.values()), modules)


def _weights(path: str, module: str, pair: dict[str, torch.Tensor], config: dict, max_lora_rank: int,
             dtype: torch.dtype) -> LoRAWeights:
    if set(pair) != {"A", "B"}:
        raise LoRAError(f"lora_path {path!r}: module {module!r} needs both lora_A and lora_B weights")
    a, b = pair["A"], pair["B"]
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
        raise LoRAError(f"lora_path {path!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                        f"{tuple(b.shape)}; expected [r, in] and [out, r]")
    if rank > max_lora_rank:
        raise LoRAError(f"lora_path {path!r}: module {module!r} has rank {rank}, over max_lora_rank="
                        f"{max_lora_rank} (--max-lora-rank)")
    alpha = config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAWeights(a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
