"""Fused projections: several nn.Linear that read the same input done as one matmul.

q/k/v become one `qkv_proj`, gate/up one `gate_up_proj`. They stay plain nn.Linear
subclasses (weight [sum(out), in]) and know where each checkpoint shard lives, which
is what weight loading needs today and what LoRA wrappers / tensor-parallel shards
will hook into later.
"""

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """nn.Linear whose output rows are the concatenation of named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a forward output back into its shards (views, no copy)."""
        return out.split(list(self.shard_sizes.values()), dim=-1)

    @torch.no_grad()
    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (e.g. k_proj.weight) into its rows of weight/bias."""
        param = getattr(self, param_name)
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        target = param[start : start + size]
        if tensor.shape != target.shape:
            raise ValueError(f"shape mismatch for shard {shard!r} of {param_name}: "
                             f"expected {tuple(target.shape)}, got {tuple(tensor.shape)}")
        target.copy_(tensor)


class QKVLinear(MergedLinear):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__(hidden, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                  "v": num_kv_heads * head_dim}, bias=bias)


class GateUpLinear(MergedLinear):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__(hidden, {"gate": intermediate, "up": intermediate}, bias=bias)
