"""The quantization seam, in vLLM's shape: a QuantizationConfig, decided once at load, gives every
linear layer its LinearMethod; the layer holds the method and calls it for its matmul.

A method owns the layer's weight storage: `create_weights` shapes it for what the checkpoint holds
before loading (GGUF blocks stay bytes), `process_weights_after_loading` turns it into the form
its kernel reads (int8 quantizes a loaded float weight), `apply` is the matmul.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection

import torch
from torch import nn


class LinearMethod(ABC):
    """How one linear layer stores its weight and multiplies by it."""

    keeps_dense_weight = True  # False: `weight` is freed after processing (unless another module shares it)

    def create_weights(self, layer: nn.Module) -> None:
        """Replace the layer's dense weight with what this method loads into (default: keep it)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded weight into the form `apply` reads (default: as loaded)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ weight^T + bias -> [..., out] in x's dtype."""

    def apply_residual(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + apply(x); a method whose kernel can add it in its output pass overrides this."""
        return residual + self.apply(layer, x)

    def apply_gelu(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """gelu(apply(x)) (torch's exact GELU); a method whose kernel can take it in its output pass
        overrides this."""
        return torch.nn.functional.gelu(self.apply(layer, x))

    def describe(self) -> str:
        """What the layer runs, for the load log ("Q4_1 blocks, VNNI kernel")."""
        return type(self).__name__


class MoEMethod(ABC):
    """How a layer's stacked experts (sluice.layers.fused_moe.StackedExperts) store their weights
    and run; the same lifecycle as LinearMethod's, for all experts of a layer at once."""

    def create_weights(self, experts: nn.Module) -> None:
        """Reshape `gate_up_proj` / `down_proj` for what the checkpoint holds (default: keep them)."""

    def process_weights_after_loading(self, experts: nn.Module) -> None:
        """Turn the loaded weights into the form `apply` reads (default: as loaded)."""

    @abstractmethod
    def apply(self, experts: nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H] routed to experts ids [T, k] with weights [T, k] -> sum over k of weight * expert(x)."""

    def describe(self) -> str:
        return type(self).__name__


class QuantizationConfig(ABC):
    """One quantization method for a whole model."""

    name: str

    @abstractmethod
    def get_linear_method(self, layer: nn.Module, checkpoint_names: list[str]) -> LinearMethod | None:
        """The method for a linear layer whose weight the checkpoint stores under these names
        (several for a fused q/k/v or gate/up); None keeps the unquantized path."""

    def get_moe_method(self, experts: nn.Module, checkpoint_names: list[str]) -> MoEMethod | None:
        """The method for a layer's stacked experts, stored in the checkpoint under these names
        (gate, up, down; each holding every expert); None keeps them dense."""
        return None

    def prepare_model(self, model: nn.Module) -> None:
        """Change modules other than linear layers before loading (default: none)."""

    def raw_weight_names(self) -> Collection[str]:
        """Checkpoint weights the loader must hand over as stored (not dequantized); only `in` is asked."""
        return ()

    def stored_block(self, name: str) -> tuple[int, int] | None:
        """(values, bytes) of one block of a weight handed over as stored blocks, which tensor-parallel
        ranks split only at whole blocks; None: not stored in blocks."""
        return None

    def log_summary(self) -> None:
        """Log, once the model is loaded, what the user should know (layers left dense)."""
