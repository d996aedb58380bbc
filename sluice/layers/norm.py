"""RMSNorm, computed in float32 and cast back before the weight multiply (as HF does),
so bfloat16 models match the reference implementation bit for bit where it matters."""

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers import native


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = native.rms_norm(x, self.weight, self.eps)
        if out is not None:
            return out
        # F.rms_norm without a weight is x * rsqrt(mean(x^2) + eps) computed in float32 and
        # rounded once to x's dtype: the same numbers as HF's explicit upcast, without copies
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)

    def forward_with_mean_square(self, x: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        """The norm of x given its rows' mean square [..., 1] (float32) over a wider vector than x
        holds: a tensor-parallel rank's share of q, normed over every rank's heads."""
        return self.weight * (x.float() * torch.rsqrt(mean_square + self.eps)).to(x.dtype)


class Float32WeightRMSNorm(RMSNorm):
    """OLMo2's RMSNorm: the weight multiplies in float32, before the one rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)).to(x.dtype)

    def forward_with_mean_square(self, x: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() * x.float() * torch.rsqrt(mean_square + self.eps)).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores the weight as an offset from 1 (zeros = identity),
    and (1 + weight) multiplies in float32, before the one rounding."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
