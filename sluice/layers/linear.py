"""Linear layers, and fused projections: several that read the same input done as one matmul.

q/k/v become one `qkv_proj`, gate/up one `gate_up_proj`. They stay nn.Linear subclasses
(weight [sum(out), in]) and know where each checkpoint shard lives, which is what weight
loading needs today and what LoRA wrappers / tensor-parallel shards will hook into later.

Each layer holds its LinearMethod (sluice/quantization): quantized methods are set at load by
`set_linear_methods`; the unquantized one runs one of two paths, chosen per layer shape at load
(`pack_linears`): the native packed kernel (sluice/layers/csrc/gemm.c, CPUs with AVX-512 BF16:
the weight repacked once into panels, the residual add and the gated activation fused into the
matmul's output pass), or
F.linear, which is oneDNN on CPU (AMX where the CPU has it) and cuBLAS on CUDA. See
linear_path.py for how the choice is made.
"""

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sluice.distributed import get_tp_group
from sluice.layers import native
from sluice.layers.activation import silu_and_mul
from sluice.layers.linear_path import choose_path
from sluice.quantization.base import LinearMethod, QuantizationConfig

if TYPE_CHECKING:
    from sluice.lora.layers import LoRALayer

logger = logging.getLogger(__name__)


class UnquantizedLinearMethod(LinearMethod):
    """The dense weight: the packed native kernel once `pack` ran, else F.linear."""

    def describe(self) -> str:
        return "unquantized"

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if layer.packed is not None:
            return native.linear(x, layer.packed, layer.out_features, layer.packed_bias)
        return F.linear(x, layer.weight, layer.bias)


UNQUANTIZED = UnquantizedLinearMethod()


class Linear(nn.Linear):
    """nn.Linear that runs through its LinearMethod, can run from a packed weight and fuses
    `residual + self(x)`."""

    quant_method: LinearMethod = UNQUANTIZED
    lora: "LoRALayer | None" = None  # set by the LoRA manager: a delta added after the base matmul
    packed: torch.Tensor | None = None
    packed_bias: torch.Tensor | None = None  # float32: the kernel adds bias before rounding

    def checkpoint_names(self, prefix: str) -> list[str]:
        """Where a checkpoint stores this layer's weight (prefix: the layer's module path)."""
        return [f"{prefix}.weight"]

    def pack(self, drop_weight: bool) -> bool:
        """Repack the weight for the native kernel; drop_weight frees the original
        (False when another module shares it, as a tied lm_head does)."""
        packed = native.pack_linear(self.rows_for_packing(self.weight.detach()))
        if packed is None:
            return False
        self.packed = packed
        self.packed_bias = None if self.bias is None else self.bias.detach().float().contiguous()
        if drop_weight:
            self.weight.data = self.weight.data.new_empty(0)
        return True

    def unpack(self) -> None:
        self.packed = self.packed_bias = None

    def rows_for_packing(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """What the model calls this layer for (timed to choose its path)."""
        return self(x)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """forward without nn.Module's hook dispatch (~2 us a call, several calls per decoder layer per
        step): no hooks are set on these layers (LoRA is a field, not a hook)."""
        return self.forward(x, residual)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None and residual is not None:
            out = native.linear(x, self.packed, self.out_features, self.packed_bias, residual, native.EPI_RESIDUAL)
        elif residual is not None:
            out = self.quant_method.apply_residual(self, x, residual)
        else:
            out = self.quant_method.apply(self, x)
        if self.lora is not None and self.lora.active:
            out = self.lora.apply(x, out)
        return out

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(self(x)), torch's exact GELU, in the matmul's output pass where the method can."""
        if self.lora is not None and self.lora.active:
            return F.gelu(self(x))
        return self.quant_method.apply_gelu(self, x)


def set_linear_methods(model: nn.Module, quant_config: QuantizationConfig) -> dict[str, int]:
    """Give every Linear the method the quantization config picks for it (shaping its weight for
    the checkpoint); how many layers run each method, for the load log."""
    counts: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        method = quant_config.get_linear_method(module, module.checkpoint_names(prefix))
        if method is not None:
            module.quant_method = method
            method.create_weights(module)
        label = module.quant_method.describe()
        counts[label] = counts.get(label, 0) + 1
    return counts


def process_weights_after_loading(model: nn.Module) -> None:
    """Each method turns its loaded weights into its kernel's form; dense copies no one needs go."""
    owners = _owners(model)
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
            if not module.quant_method.keeps_dense_weight and owners[id(module.weight)] == 1:
                module.weight.data = module.weight.data.new_empty(0)


def _owners(model: nn.Module) -> dict[int, int]:
    """How many modules hold each parameter (a tied lm_head shares the embedding's)."""
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    return owners


def pack_linears(model: nn.Module) -> int:
    """Give every unquantized Linear of the model the faster of the packed native kernel and
    F.linear for its shape (a no-op where the native kernel can't run); returns how many were packed."""
    owners = _owners(model)
    linears = [module for module in model.modules()
               if isinstance(module, Linear) and module.quant_method is UNQUANTIZED]
    packed = sum(module.pack(drop_weight=owners[id(module.weight)] == 1)
                 for module in linears if choose_path(module) == "native")
    logger.info("linear layers: %d on the packed native kernel, %d on F.linear", packed, len(linears) - packed)
    return packed


class RowParallelLinear(Linear):
    """A Linear whose input features are split across tensor-parallel ranks (o_proj, down_proj):
    each rank's partial product is summed by an all-reduce before the residual add. in_features
    is this rank's share; the bias lives on rank 0 only (others load zeros). reduce_results=False
    returns the partial product, for a caller that sums it with others in one all-reduce (a
    shared expert beside the routed ones)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        tp = get_tp_group()
        if tp.world_size == 1 or not self.reduce_results:
            return super().forward(x, residual)
        out = tp.all_reduce(super().forward(x))
        return out if residual is None else out + residual

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)  # timed alone (linear_path): no collective its peers don't join


class MergedLinear(Linear):
    """nn.Linear whose output rows are the concatenation of named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size

    def checkpoint_names(self, prefix: str) -> list[str]:
        """One per shard: a fused `qkv_proj` is stored as q_proj, k_proj and v_proj beside it."""
        parent = prefix.rpartition(".")[0]
        return [f"{parent}.{shard}_proj.weight" for shard in self.shard_sizes]

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

    def pack(self, drop_weight: bool) -> bool:
        # The fused epilogue wants each 64-column panel to hold 32 gate then 32 up columns.
        if self.bias is not None or self.out_features % native.PANEL:
            return False
        return super().pack(drop_weight)

    def rows_for_packing(self, weight: torch.Tensor) -> torch.Tensor:
        half = native.PANEL // 2
        gate, up = weight.view(2, -1, half, weight.shape[1]).unbind(0)
        return torch.stack((gate, up), dim=1).reshape(weight.shape)  # [g0..g31, u0..u31, g32.., u32.., ...]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.silu_and_mul(x)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x) -> [..., intermediate]."""
        if self.packed is None:
            return silu_and_mul(super().forward(x))
        if self.lora is None or not self.lora.active:
            return native.linear(x, self.packed, self.out_features, epilogue=native.EPI_SILU_MUL)
        # the LoRA delta goes in before the activation: run the matmul alone (its output, and the
        # LoRA B^T, in the panel order), then the delta and the activation in one pass
        out = native.linear(x, self.packed, self.out_features)
        fused = self.lora.apply_silu_mul(x, out)
        if fused is not None:
            return fused
        out = self.lora.apply(x, out)
        half = native.PANEL // 2
        out = out.view(-1, self.out_features // native.PANEL, 2, half).transpose(1, 2).reshape(-1, self.out_features)
        return silu_and_mul(out)
