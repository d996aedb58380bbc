"""The LoRA delta a linear layer adds after its base matmul: y += (x @ A^T) @ B^T, per adapter.

The base weight is never touched (packed, quantized or dense, it runs as it would without
LoRA). Each hooked layer holds one slot per resident adapter, A and B stacked over slots; a fused
layer (qkv_proj, gate_up_proj) puts its shards' A side by side and their B block-diagonally, so
one pair of matmuls serves all shards. Which rows use which slot is decided once per step
(`LoRAStep`, shared by every layer). A step whose rows all use one adapter multiplies by that
slot alone; a mixed step multiplies every row by all slots stacked and zeroes, with a row-slot
mask, the products of the slots a row does not use: a fixed four operations per layer whatever
the mix, where a loop over adapter groups would cost four per adapter (each small CPU operation
pays a thread hand-off). A step without adapters does no LoRA work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.lora.adapter import LoRAWeights


@dataclass
class LoRAStep:
    """This step's rows and slots: `slot` when every row uses that one; else `mask` [rows,
    max_loras], 1 where a row uses a slot (all 0: the base model). Neither: no LoRA this step."""

    slot: int | None = None
    mask: torch.Tensor | None = None
    _widened: dict[int, torch.Tensor] = field(default_factory=dict)

    def set(self, slot: int | None = None, mask: torch.Tensor | None = None) -> None:
        self.slot, self.mask = slot, mask
        self._widened = {}

    @property
    def active(self) -> bool:
        return self.slot is not None or self.mask is not None

    def widened(self, width: int) -> torch.Tensor:
        """The mask with each slot's column repeated `width` times (once per step and width)."""
        if width not in self._widened:
            self._widened[width] = self.mask.repeat_interleave(width, dim=1)
        return self._widened[width]


class LoRALayer:
    """One linear layer's adapter slots."""

    def __init__(self, shards: list[tuple[int, int]], in_features: int, out_features: int, max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device, step: LoRAStep) -> None:
        """shards: (first output row, rows) of each part an adapter may target."""
        self.shards = shards
        self.step = step
        self.dtype = dtype
        self.width = len(shards) * max_rank
        self.lora_a = torch.zeros(max_loras, self.width, in_features, dtype=dtype, device=device)
        self.lora_b_t = torch.zeros(max_loras, self.width, out_features, dtype=dtype, device=device)  # B^T
        self.ranks = [0] * max_loras  # columns of A / B in use per slot

    @property
    def active(self) -> bool:
        return self.step.active

    def set_slot(self, slot: int, weights: list[LoRAWeights | None]) -> None:
        """Put one adapter's weights for each shard (None: not targeted) into a slot."""
        self.lora_a[slot].zero_()
        self.lora_b_t[slot].zero_()
        column = 0
        for (start, size), w in zip(self.shards, weights):
            if w is None:
                continue
            end = column + w.rank
            self.lora_a[slot, column:end] = w.lora_a
            self.lora_b_t[slot, column:end, start : start + size] = w.lora_b.T
            column = end
        self.ranks[slot] = column

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base layer's output for x) plus each row's adapter delta, in place."""
        x = x.to(self.dtype)
        slot = self.step.slot
        if slot is not None:
            rank = self.ranks[slot]
            if not rank:
                return out
            xa, b_t = torch.mm(x, self.lora_a[slot, :rank].T), self.lora_b_t[slot, :rank]
        else:
            columns = self.lora_a.shape[0] * self.width
            xa = torch.mm(x, self.lora_a.view(columns, -1).T).mul_(self.step.widened(self.width))
            b_t = self.lora_b_t.view(columns, -1)
        if out.dtype == self.dtype:
            return out.addmm_(xa, b_t)
        return out.add_(torch.mm(xa, b_t).to(out.dtype))
