"""Mixture-of-experts feed-forward: a router picks top-k experts per token, then the tokens are
grouped by expert (sorted by expert id) so each expert's weights are read once per step, however
many tokens chose it.

Expert weights are stacked as in transformers >= 5: `gate_up_proj` [E, 2I, H] (gate rows, then
up rows) and `down_proj` [E, H, I]. `pack_experts` puts each projection on the packed native
kernel (gemm.c: the same panels and fused SiLU x up epilogue as a dense MLP's) where that is the
dense layers' measured choice for the same shapes (linear_path.py). With both packed, one native
call (moe.c) sorts, runs every touched expert and sums the slots, no Python between experts;
otherwise each expert's two matmuls run in a loop here, on F.linear or the packed kernel.
Quantized experts (`--quantization int8`, a GGUF's expert blocks) run through the MoEMethod the
quantization config gives them at load (`set_moe_methods`, sluice/quantization).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sluice.distributed import get_tp_group
from sluice.layers import native
from sluice.layers.activation import silu_and_mul
from sluice.layers.linear import GateUpLinear, Linear
from sluice.layers.linear_path import choose_path
from sluice.quantization.base import MoEMethod, QuantizationConfig

logger = logging.getLogger(__name__)

ScoringFunc = Literal["softmax", "sigmoid"]


def route(router_logits: torch.Tensor, top_k: int, scoring_func: ScoringFunc,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k]), scored in float32
    as transformers does."""
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class StackedExperts(nn.Module):
    """E gated-SiLU MLPs, silu(x Wg^T) * (x Wu^T) Wd^T, with their weights stacked."""

    packed_gate_up: torch.Tensor | None = None  # [E, panels of 2I x H]
    packed_down: torch.Tensor | None = None  # [E, panels of H x I]
    quant_method: MoEMethod | None = None  # set at load for quantized experts

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] with routing weights/ids [T, k] -> sum over k of weight * expert(x), [T, H]."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, weights, ids)
        if self.packed_gate_up is not None and self.packed_down is not None:
            return self.forward_native(x, weights, ids)
        return self.grouped(x, weights, ids, self.expert)

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """forward's arithmetic with each expert's MLP as `expert(e, rows)` runs it, one call per
        touched expert over all the rows routed to it."""
        top_k = ids.shape[1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        grouped = x[tokens]
        out = torch.empty_like(grouped)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start:start + n] = expert(e, grouped[start:start + n])
                start += n
        # back in (token, slot) order by a gather: a scatter-add of the rows is far slower on CPU
        per_slot = out[order.argsort()].view(*ids.shape, -1)
        return (per_slot.float() * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """forward's arithmetic in one call of moe.c over both packed projections."""
        x, ids, weights = x.contiguous(), ids.to(torch.int64).contiguous(), weights.float().contiguous()
        (T, top_k), H, I = ids.shape, self.hidden_size, self.intermediate_size
        scratch = x.new_empty(T * top_k * (2 * H + I))
        out = torch.empty_like(x)
        status = native.load_library().moe_experts_bf16(
            x.data_ptr(), T, H, I, top_k, ids.data_ptr(), weights.data_ptr(), self.num_experts,
            self.packed_gate_up.data_ptr(), self.packed_gate_up.stride(0), self.packed_down.data_ptr(),
            self.packed_down.stride(0), scratch.data_ptr(), out.data_ptr())
        if status != 0:
            raise RuntimeError(f"moe_experts_bf16 rejected {T} tokens x {H} hidden ({self.num_experts} experts)")
        return out

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's MLP over the rows routed to it."""
        if self.packed_gate_up is not None:
            h = native.linear(x, self.packed_gate_up[e], 2 * self.intermediate_size, epilogue=native.EPI_SILU_MUL)
        else:
            h = silu_and_mul(F.linear(x, self.gate_up_proj[e]))
        if self.packed_down is not None:
            return native.linear(h, self.packed_down[e], self.hidden_size)
        return F.linear(h, self.down_proj[e])

    def checkpoint_names(self, prefix: str) -> list[str]:
        """Where a checkpoint holding every expert per projection stores them (gate, up, down)."""
        return [f"{prefix}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]

    def pack(self) -> int:
        """Repack each projection's experts for the native kernel (freeing the stacked originals)
        where that is the dense layers' measured choice for its shape; returns how many were packed."""
        if self.quant_method is not None:
            return 0
        H, I = self.hidden_size, self.intermediate_size
        with torch.device("meta"):  # a dense layer of one expert's shape: its path choice and packing
            probes = {"gate_up": GateUpLinear(H, I), "down": Linear(I, H, bias=False)}
        return sum(self._pack_projection(name, probe) for name, probe in probes.items())

    def _pack_projection(self, name: str, probe: Linear) -> bool:
        param: nn.Parameter = getattr(self, f"{name}_proj")
        if getattr(self, f"packed_{name}") is not None:
            return True
        panels = []
        for e in range(self.num_experts):
            probe.weight = nn.Parameter(param[e].detach(), requires_grad=False)
            if e == 0 and choose_path(probe) != "native":
                return False
            if not probe.pack(drop_weight=False):
                return False
            panels.append(probe.packed)
        setattr(self, f"packed_{name}", torch.stack(panels))
        param.data = param.data.new_empty(0)
        return True


class FusedMoE(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's shared expert, scaled by sigmoid(its gate)).

    `gate` is the router, named as in Hugging Face checkpoints (`mlp.gate.weight`)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 renormalize: bool, scoring_func: ScoringFunc = "softmax", activation: str = "silu",
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts "
                             f"({num_experts})")
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid'; got {scoring_func!r}")
        if activation != "silu":
            raise ValueError(f"hidden_act={activation!r} is not supported for experts; supported: 'silu'")
        self.top_k, self.renormalize, self.scoring_func = top_k, renormalize, scoring_func
        self.gate = Linear(hidden_size, num_experts, bias=False)  # replicated on every rank
        # tensor parallel: each rank holds every expert's 1/N of the intermediate dim
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size // get_tp_group().world_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_gate else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H] -> (residual +) moe(x); on several ranks, each rank's partial sums (routed and
        shared experts together) meet in one all-reduce."""
        weights, ids = route(self.gate(x), self.top_k, self.scoring_func, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        out = get_tp_group().all_reduce(out)
        return out if residual is None else residual + out


def set_moe_methods(model: nn.Module, quant_config: QuantizationConfig) -> dict[str, int]:
    """Give every layer's experts the method the quantization config picks (shaping their weights
    for the checkpoint); how many layers run each, for the load log."""
    counts: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, StackedExperts):
            method = quant_config.get_moe_method(module, module.checkpoint_names(prefix))
            if method is not None:
                module.quant_method = method
                method.create_weights(module)
            label = "experts " + (method.describe() if method is not None else "unquantized")
            counts[label] = counts.get(label, 0) + 1
    return counts


def process_moe_weights_after_loading(model: nn.Module) -> None:
    """Each quantized layer of experts turns its loaded weights into its kernel's form."""
    for module in model.modules():
        if isinstance(module, StackedExperts) and module.quant_method is not None:
            module.quant_method.process_weights_after_loading(module)


def pack_experts(model: nn.Module) -> int:
    """Put the experts' projections (gate_up, down) on the packed native kernel where that is the
    faster path for their shapes (a no-op where the kernel can't run); returns how many were packed."""
    experts = [module for module in model.modules()
               if isinstance(module, StackedExperts) and module.quant_method is None]
    packed = sum(module.pack() for module in experts)
    if experts:
        logger.info("expert projections: %d on the packed native kernel, %d on F.linear", packed,
                    2 * len(experts) - packed)
    return packed


# Expert tensors in checkpoints: one per expert (Mixtral's w1/w3/w2; Qwen's and OLMoE's
# gate_proj/up_proj/down_proj), or one per projection holding every expert (GGUF's ffn_*_exps).
_EXPERT_TENSOR = re.compile(
    r"(?P<experts>.*\.experts)(?:\.(?P<expert>\d+))?\.(?P<proj>\w+)\.(?P<leaf>weight(?:_scale)?)")
_EXPERT_PROJ = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def stack_expert_weights(weights: Iterable[tuple[str, torch.Tensor]],
                         num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn expert checkpoint tensors into the stacked `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I] (an int8 checkpoint's `weight_scale` [out, 1] likewise, into
    `gate_up_proj_scale` / `down_proj_scale`), each yielded as soon as all its parts have arrived
    (so at most one layer's experts wait in memory); other tensors, stacked ones included, pass through."""
    waiting: dict[str, dict[tuple[int | None, str], torch.Tensor]] = {}
    for name, tensor in weights:
        match = _EXPERT_TENSOR.fullmatch(name)
        if match is None or match["proj"] not in _EXPERT_PROJ:
            yield name, tensor
            continue
        expert, proj = match["expert"] and int(match["expert"]), _EXPERT_PROJ[match["proj"]]
        if expert is not None and expert >= num_experts:
            raise ValueError(f"unexpected parameter {name!r}: expert {expert} but the config has {num_experts} experts")
        suffix = "_scale" if match["leaf"] == "weight_scale" else ""
        target = f"{match['experts']}.{'down_proj' if proj == 'down' else 'gate_up_proj'}{suffix}"
        parts = waiting.setdefault(target, {})
        parts[expert, proj] = tensor
        if not _missing(target, parts, num_experts):
            del waiting[target]
            yield target, _stack(parts, num_experts, target)
    if waiting:
        missing = sorted(m for target, parts in waiting.items() for m in _missing(target, parts, num_experts))
        raise ValueError(f"expert weights never loaded: {', '.join(missing[:10])}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))


def _projections(target: str) -> tuple[str, ...]:
    return ("down",) if target.removesuffix("_scale").endswith("down_proj") else ("gate", "up")


def _experts(parts: dict[tuple[int | None, str], torch.Tensor], num_experts: int) -> list[int | None]:
    """The expert keys a stacked tensor needs: None alone when its parts hold every expert."""
    return [None] if any(e is None for e, _ in parts) else list(range(num_experts))


def _missing(target: str, parts: dict[tuple[int | None, str], torch.Tensor], num_experts: int) -> list[str]:
    return [f"{target} ({'all experts' if e is None else f'expert {e}'} {p})"
            for e in _experts(parts, num_experts) for p in _projections(target) if (e, p) not in parts]


def _stack(parts: dict[tuple[int | None, str], torch.Tensor], num_experts: int, target: str) -> torch.Tensor:
    """One [E, out, in] tensor from per-expert [out, in] parts, or from all-expert [E, out, in] ones."""
    experts = _experts(parts, num_experts)
    try:
        rows = [torch.cat([parts[e, p] for p in _projections(target)], dim=-2) for e in experts]
        return rows[0] if experts == [None] else torch.stack(rows)
    except RuntimeError as e:
        raise ValueError(f"{target}: the experts' tensors differ in shape ({e})") from None


def expert_checkpoint_names(names: list[str]) -> list[str]:
    """A model's checkpoint names with each stacked expert tensor under the per-projection names
    that hold every expert (`experts.gate_proj.weight` [E, I, H], ..., GGUF's ffn_*_exps)."""
    split = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    out = []
    for name in names:
        experts, _, leaf = name.rpartition(".")
        if experts.endswith(".experts") and leaf in split:
            out += [f"{experts}.{proj}.weight" for proj in split[leaf]]
        else:
            out.append(name)
    return out
