"""The LoRA delta a linear layer adds after its base matmul: y += (x @ A^T) @ B^T, per adapter.

The base weight is never touched (packed, quantized or dense, it runs as it would without
LoRA). Each hooked layer holds one slot per resident adapter, A and B^T stacked over slots; a
fused layer (qkv_proj, gate_up_proj) puts its shards' A side by side and their B block-diagonally,
so one pair of matmuls serves all shards. Which rows use which slot is decided once per step
(`LoRAStep`, shared by every layer). A step without adapters does no LoRA work.

Two ways to compute it:
- bf16 on a CPU with the native kernels: one call per layer (native.lora, lora.c) in which each
  row reads only its own adapter's A and B, whatever the step's mix; on a packed gate_up layer
  it also does the activation, in the kernel's panel order (B^T's columns are stored permuted
  alike), so the output makes one trip through memory.
- otherwise (float32, GPUs): torch matmuls. A step whose rows all use one adapter multiplies by
  that slot alone; a mixed step multiplies every row by all slots stacked and zeroes, with a
  row-slot mask, the products of the slots a row does not use: a fixed four operations per layer
  whatever the mix, where a loop over adapter groups would cost four per adapter.
"""

from __future__ import annotations

import torch

from sluice.layers import native
from sluice.lora.adapter import LoRAWeights


class LoRAStep:
    """This step's rows and slots, shared by every layer: `slots` [rows] int32 (-1: the base
    model) and `slot` when every row uses that one. No slots: no LoRA this step."""

    def __init__(self, max_loras: int, dtype: torch.dtype, device: torch.device) -> None:
        self.max_loras, self.dtype, self.device = max_loras, dtype, device
        self.set(None)

    def set(self, row_slots: list[int] | None) -> None:
        self.slots = None if row_slots is None else torch.tensor(row_slots, dtype=torch.int32, device=self.device)
        self.slot = row_slots[0] if row_slots and row_slots[0] >= 0 and len(set(row_slots)) == 1 else None
        self._mask: torch.Tensor | None = None
        self._widened: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.slots is not None

    def widened(self, width: int) -> torch.Tensor:
        """[rows, max_loras * width]: 1 where a row uses the slot a column belongs to (once per step and width)."""
        if width not in self._widened:
            if self._mask is None:
                rows = self.slots.long().where(self.slots >= 0, self.max_loras)
                self._mask = torch.eye(self.max_loras + 1, dtype=self.dtype, device=self.device)[rows, : self.max_loras]
            self._widened[width] = self._mask.repeat_interleave(width, dim=1)
        return self._widened[width]


class LoRALayer:
    """One linear layer's adapter slots."""

    def __init__(self, shards: list[tuple[int, int]], width: int, in_features: int, out_features: int,
                 max_loras: int, dtype: torch.dtype, device: torch.device, step: LoRAStep,
                 panel_order: bool = False) -> None:
        """shards: (first output row, rows) of each part an adapter may target; width: A's rows
        per slot (the most an adapter can use); panel_order: the base output comes in the packed
        gate/up panel order (a packed GateUpLinear), which B^T's columns then follow."""
        self.shards = shards
        self.step = step
        self.dtype = dtype
        self.width = width
        self.lora_a = torch.zeros(max_loras, width, in_features, dtype=dtype, device=device)
        self.lora_b_t = torch.zeros(max_loras, width, out_features, dtype=dtype, device=device)  # B^T
        self.ranks = torch.zeros(max_loras, dtype=torch.int32, device=device)  # columns in use per slot
        self.columns = _panel_columns(out_features) if panel_order else None

    @property
    def active(self) -> bool:
        return self.step.active

    def set_slot(self, slot: int, weights: list[LoRAWeights | None]) -> None:
        """Put one adapter's weights for each shard (None: not targeted) into a slot."""
        self.lora_a[slot].zero_()
        b_t = torch.zeros_like(self.lora_b_t[slot])
        column = 0
        for (start, size), w in zip(self.shards, weights):
            if w is None:
                continue
            end = column + w.rank
            self.lora_a[slot, column:end] = w.lora_a
            b_t[column:end, start : start + size] = w.lora_b.T
            column = end
        self.lora_b_t[slot] = b_t if self.columns is None else b_t[:, self.columns]
        self.ranks[slot] = column

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base layer's output for x) plus each row's adapter delta, in place."""
        step = self.step
        if native.lora(x, step.slots, self.ranks, self.lora_a, self.lora_b_t, out) is not None:
            return out
        x = x.to(self.dtype)
        if step.slot is not None:
            rank = int(self.ranks[step.slot])
            if not rank:
                return out
            xa, b_t = torch.mm(x, self.lora_a[step.slot, :rank].T), self.lora_b_t[step.slot, :rank]
        else:
            columns = self.lora_a.shape[0] * self.width
            xa = torch.mm(x, self.lora_a.view(columns, -1).T).mul_(step.widened(self.width))
            b_t = self.lora_b_t.view(columns, -1)
        if out.dtype == self.dtype:
            return out.addmm_(xa, b_t)
        return out.add_(torch.mm(xa, b_t).to(out.dtype))

    def apply_silu_mul(self, x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of panels (a packed gate_up's output in its panel order) plus each row's
        delta, in one pass; None when the native kernel can't (then `apply` adds the delta in the
        panel order and the caller reorders)."""
        if self.columns is None:
            return None
        return native.lora(x, self.step.slots, self.ranks, self.lora_a, self.lora_b_t, panels, silu_mul=True)


def _panel_columns(out_features: int) -> torch.Tensor:
    """The original column at each position of the packed gate/up panel order (see GateUpLinear)."""
    half = native.PANEL // 2
    return torch.arange(out_features).view(2, -1, half).transpose(0, 1).reshape(-1)
