"""int8 weights, quantized at load (`--quantization int8`) or read as they are from a
compressed-tensors W8A8 / W8A16 int8 checkpoint.

`--quantization int8` gives every output row a scale per 32 weights (GGML's Q8_0 blocks), in dense
layers and in each expert of a mixture-of-experts layer alike, and runs on the GGUF kernels (activations quantized per 32 values too): one scale per whole row, with
activations per token, cost SmolLM2 19% perplexity (2.4% weight-only), blocks of 32 well under 1%.
A compressed-tensors checkpoint keeps its own scheme, a scale per output channel: W8A8 on CPUs
with AVX-512 VNNI (quant.c's linear_int8: each activation row quantized with its own scale,
weights packed once at load into 64-column panels), weight-only elsewhere (the int8 weight widened
per call for F.linear). Its experts keep their int8 values too, as Q8_0 blocks whose every scale
is the channel's (in float16, as Q8_0 stores it), on the GGUF experts' kernel like int8's.
"""

from __future__ import annotations

import logging
import re

import gguf
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sluice.distributed import get_tp_group
from sluice.layers import native
from sluice.loader import ModelLoadError
from sluice.platform import cpu_flags
from sluice.quantization.base import LinearMethod, MoEMethod, QuantizationConfig
from sluice.quantization.gguf import GGUFLinearMethod, GGUFMoEMethod
from sluice.quantization.gguf import kernel_available as gguf_kernel_available

logger = logging.getLogger("sluice")

PANEL = 64  # output columns per packed panel (quant.c's PANEL8)
FLOAT16_NORMAL = (2.0 ** -14, 65504.0)  # scales Q8_0's float16 holds to 11 bits
_KERNEL_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


def kernel_available() -> bool:
    return _KERNEL_FLAGS <= cpu_flags() and native.load_library() is not None


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 [N, K], scale float32 [N]) with weight ~ q * scale."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / 127
    q = torch.round(weight / torch.where(scale > 0, scale, 1)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] -> (the panels linear_int8 reads, the per-row sums of q it subtracts)."""
    n, k = q.shape
    packed = torch.empty(-(-n // PANEL) * PANEL * -(-k // 4) * 4, dtype=torch.int8)
    qsum = torch.empty(n, dtype=torch.int32)
    q = q.contiguous()
    native.load_library().pack_int8(q.data_ptr(), packed.data_ptr(), qsum.data_ptr(), n, k)
    return packed, qsum


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (K a multiple of 32) -> GGML Q8_0 blocks, uint8 [N, K / 32 * 34]: per 32
    values a float16 scale amax / 127 and 32 int8."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // 32, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale > 0, scale, 1)).clamp(-127, 127).to(torch.int8)
    return torch.cat((scale.half().view(torch.uint8), q.view(torch.uint8)), dim=-1).reshape(n, -1).contiguous()


class Int8LinearMethod(GGUFLinearMethod):
    """`--quantization int8`: the loaded float weight becomes Q8_0 blocks (the dense copy goes
    unless another module shares it)."""

    keeps_dense_weight = False

    def __init__(self) -> None:
        super().__init__(gguf.GGMLQuantizationType.Q8_0)

    def create_weights(self, layer: nn.Module) -> None:
        pass  # loads dense, quantized after loading

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # a Parameter, so the repacked flag survives sleep mode swapping its data
        layer.int8_blocks = nn.Parameter(quantize_q8_0(layer.weight.detach()), requires_grad=False)
        super().process_weights_after_loading(layer)

    def blocks(self, layer: nn.Module) -> torch.Tensor:
        return layer.int8_blocks

    def describe(self) -> str:
        return "int8 blocks of 32 " + ("(VNNI kernel)" if gguf_kernel_available() else "(dequantized per call)")


class Int8MoEMethod(GGUFMoEMethod):
    """`--quantization int8` for a layer's experts: each expert's loaded float weights become Q8_0
    blocks (a scale per output channel and 32 inputs), run by the GGUF experts' kernel."""

    def __init__(self) -> None:
        super().__init__(gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q8_0)

    def create_weights(self, experts: nn.Module) -> None:
        pass  # loads dense, quantized after loading

    def process_weights_after_loading(self, experts: nn.Module) -> None:
        for name in ("gate_up_proj", "down_proj"):
            dense: nn.Parameter = getattr(experts, name)
            E, N, K = dense.shape
            blocks = quantize_q8_0(dense.detach().reshape(E * N, K)).view(E, N, -1)
            setattr(experts, name, nn.Parameter(blocks, requires_grad=False))

    def describe(self) -> str:
        return "int8 blocks of 32 " + ("(VNNI kernel)" if gguf_kernel_available() else "(dequantized per call)")


def q8_0_from_channel_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] (K a multiple of 32) with a scale per row [N] -> the same values as Q8_0
    blocks, uint8 [N, K / 32 * 34]: every block of a row carries the row's scale."""
    n, k = q.shape
    scales = scale.reshape(n, 1, 1).to(torch.float16).expand(n, k // 32, 1).contiguous().view(torch.uint8)
    return torch.cat((scales, q.reshape(n, k // 32, 32).view(torch.uint8)), dim=-1).reshape(n, -1).contiguous()


class ChannelInt8Method(LinearMethod):
    """int8 weights with a scale per output channel (compressed-tensors), W8A8 with per-token
    activation scales where VNNI is, else weight-only."""

    keeps_dense_weight = False

    @staticmethod
    def set_weights(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> None:
        layer.int8_scale = scale.float().contiguous()
        layer.int8_bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        if kernel_available():
            layer.int8_packed, layer.int8_sums = pack(q)
        else:
            layer.int8_weight = q.contiguous()

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._run(layer, x)

    def apply_residual(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._run(layer, x, residual)

    def apply_gelu(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._run(layer, x, epilogue=native.EPI_GELU)

    def _run(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
             epilogue: int = native.EPI_STORE) -> torch.Tensor:
        """The VNNI kernel, with the residual add or GELU in its output pass; else weight-only."""
        packed = getattr(layer, "int8_packed", None)
        if packed is None or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
            out = self.weight_only(layer, x)
            if epilogue == native.EPI_GELU:
                return F.gelu(out)
            return out if residual is None else residual + out
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = x.new_empty(x.shape[0], layer.out_features)
        if residual is not None:
            residual = residual.reshape(-1, layer.out_features).to(x.dtype)
            if residual.stride(-1) != 1:
                residual = residual.contiguous()
            epilogue = native.EPI_RESIDUAL
        bias, amax = layer.int8_bias, self.row_amax_across_ranks(layer, x)
        status = native.load_library().linear_int8(
            x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), int(x.dtype == torch.bfloat16), packed.data_ptr(),
            layer.int8_scale.data_ptr(), layer.int8_sums.data_ptr(), layer.out_features,
            None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0), out.data_ptr(), out.stride(0), epilogue,
            None if amax is None else amax.data_ptr())
        if status != 0:
            raise RuntimeError(f"linear_int8 failed ({status}) for shape {tuple(shape)} x {layer.out_features}")
        return out.view(*shape[:-1], layer.out_features)

    @staticmethod
    def row_amax_across_ranks(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's max |x| over every rank's share, where tensor-parallel ranks split the layer's
        inputs (o, down): each rank then quantizes its share with the whole row's scale, so their
        integer products sum to one rank's (one small all-reduce per call). None: x is whole here."""
        from sluice.layers.linear import RowParallelLinear

        tp = get_tp_group()
        if tp.world_size == 1 or not isinstance(layer, RowParallelLinear):
            return None
        return tp.all_reduce(x.abs().amax(dim=-1).float(), op=dist.ReduceOp.MAX)

    @staticmethod
    def weight_only(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, layer.int8_weight.to(x.dtype)) * layer.int8_scale.to(x.dtype)
        return out if layer.bias is None else out + layer.bias

    def describe(self) -> str:
        return "int8 per channel " + ("W8A8 (VNNI kernel)" if kernel_available() else "weight-only")


class Int8Config(QuantizationConfig):
    """`--quantization int8`: every linear layer's and expert's float weight quantized at load: Q8_0
    blocks, or for an encoder (per_channel) a scale per output channel."""

    name = "int8"

    def __init__(self, per_channel: bool = False) -> None:
        self.per_channel = per_channel

    def get_linear_method(self, layer: nn.Module, checkpoint_names: list[str]) -> LinearMethod | None:
        from sluice.layers.linear import RowParallelLinear

        if self.per_channel:
            return Int8ChannelAtLoadMethod()
        if isinstance(layer, RowParallelLinear):
            check_split(layer.in_features, checkpoint_names)
        return Int8LinearMethod() if layer.in_features % 32 == 0 else None

    def get_moe_method(self, experts: nn.Module, checkpoint_names: list[str]) -> MoEMethod | None:
        check_split(experts.intermediate_size, checkpoint_names[-1:])  # down_proj's inputs
        return Int8MoEMethod() if experts.hidden_size % 32 == 0 == experts.intermediate_size % 32 else None


def check_split(share: int, checkpoint_names: list[str]) -> None:
    """Refuse a layer whose inputs tensor-parallel ranks split (o, down) into shares that are not
    whole blocks of 32: each rank's blocks would not be the blocks one rank quantizes."""
    tp = get_tp_group()
    if tp.world_size > 1 and share % 32:
        raise ValueError(f"quantization='int8' (--quantization) with tensor_parallel_size={tp.world_size}: "
                         f"{checkpoint_names[0]} splits its {share * tp.world_size} inputs into shares of {share}, "
                         "not whole int8 blocks of 32; use fewer ranks or quantization 'none'")


class Int8ChannelAtLoadMethod(ChannelInt8Method):
    """`--quantization int8` on an encoder: the loaded float weight quantized per output channel."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.set_weights(layer, *quantize_per_channel(layer.weight.detach()))


class CompressedInt8Method(ChannelInt8Method):
    """A compressed-tensors int8 layer: `weight` int8 [N, K] and `weight_scale` [N, 1] loaded as stored."""

    def create_weights(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, dtype=torch.int8),
                                    requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(layer.out_features, 1), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.set_weights(layer, layer.weight.detach(), layer.weight_scale.detach().view(-1))
        del layer.weight_scale


class CompressedInt8MoEMethod(Int8MoEMethod):
    """A compressed-tensors layer of experts: int8 `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]
    and their scales per output channel [E, out, 1], stacked from the per-expert tensors as stored,
    then run as Q8_0 blocks. Shapes the blocks can't hold (hidden or intermediate size not a
    multiple of 32, scales outside float16's normal range) load dequantized, with a log line."""

    def create_weights(self, experts: nn.Module) -> None:
        self.dtype = experts.gate_up_proj.dtype  # the model's, for experts loaded dequantized
        E, H, I = experts.num_experts, experts.hidden_size, experts.intermediate_size
        for name, (out, inp) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
            setattr(experts, name, nn.Parameter(torch.empty(E, out, inp, dtype=torch.int8), requires_grad=False))
            setattr(experts, f"{name}_scale", nn.Parameter(torch.empty(E, out, 1), requires_grad=False))

    def process_weights_after_loading(self, experts: nn.Module) -> None:
        pairs = {name: (getattr(experts, name).detach(), getattr(experts, f"{name}_scale").detach().float())
                 for name in ("gate_up_proj", "down_proj")}
        for name in pairs:
            delattr(experts, f"{name}_scale")
        low, high = FLOAT16_NORMAL
        blocks_hold = experts.hidden_size % 32 == 0 == experts.intermediate_size % 32 and all(
            bool((scale.abs() >= low).all() and (scale.abs() <= high).all()) for _, scale in pairs.values())
        for name, (q, scale) in pairs.items():
            E, N, K = q.shape
            if blocks_hold:
                data = q8_0_from_channel_int8(q.reshape(E * N, K), scale.reshape(-1)).view(E, N, -1)
            else:
                data = (q.float() * scale).to(self.dtype)
            setattr(experts, name, nn.Parameter(data, requires_grad=False))
        if not blocks_hold:
            experts.quant_method = None  # dense experts: the packed kernel may take them
            logger.info("compressed-tensors experts of hidden %d, intermediate %d: Q8_0 blocks can't hold their "
                        "shapes or scales; loaded dequantized", experts.hidden_size, experts.intermediate_size)

    def describe(self) -> str:
        return "int8 per channel as Q8_0 blocks " + ("(VNNI kernel)" if gguf_kernel_available()
                                                      else "(dequantized per call)")


class _StoredNames:
    """Checkpoint names the loader hands over as stored: exact names, and every per-expert weight
    and scale (their tensor names depend on the family: w1 / gate_proj, block_sparse_moe / mlp)."""

    _EXPERT = re.compile(r".*\.experts\.\d+\.\w+\.weight(?:_scale)?")

    def __init__(self, names: set[str], experts: bool) -> None:
        self.names, self.experts = names, experts

    def __contains__(self, name: object) -> bool:
        return name in self.names or (self.experts and isinstance(name, str) and bool(self._EXPERT.fullmatch(name)))


class CompressedTensorsConfig(QuantizationConfig):
    """A checkpoint in compressed-tensors' int-quantized format: int8 weights per channel (W8A16),
    with or without dynamic per-token int8 activations (W8A8); sluice runs both as W8A8 where VNNI is."""

    name = "compressed-tensors"

    def __init__(self, declared: dict, path: str) -> None:
        self.ignore = list(declared.get("ignore") or [])
        for name, group in (declared.get("config_groups") or {}).items():
            check_group(name, group, path)
        if not declared.get("config_groups"):
            raise ModelLoadError(f"{path}: compressed-tensors quantization_config has no config_groups")
        self.stored: set[str] = set()
        self.quantized_experts = False

    def get_linear_method(self, layer: nn.Module, checkpoint_names: list[str]) -> LinearMethod | None:
        modules = [name.removesuffix(".weight") for name in checkpoint_names]
        if any(self.ignored(module) for module in modules):
            return None
        self.stored.update(checkpoint_names)
        self.stored.update(f"{module}.weight_scale" for module in modules)
        return CompressedInt8Method()

    def get_moe_method(self, experts: nn.Module, checkpoint_names: list[str]) -> MoEMethod | None:
        if any(self.ignored(name.removesuffix(".weight")) for name in checkpoint_names):
            return None
        self.quantized_experts = True
        return CompressedInt8MoEMethod()

    def ignored(self, module: str) -> bool:
        return any(re.fullmatch(rule[3:], module) if rule.startswith("re:") else module == rule or
                   module.endswith("." + rule) for rule in self.ignore)

    def raw_weight_names(self) -> _StoredNames:
        return _StoredNames(self.stored, self.quantized_experts)


def check_group(name: str, group: dict, path: str) -> None:
    """Only int8 per-channel symmetric weights, and dynamic per-token int8 activations or none."""
    weights = group.get("weights") or {}
    inputs = group.get("input_activations")
    problems = []
    if (weights.get("num_bits"), weights.get("type"), weights.get("symmetric", True)) != (8, "int", True):
        problems.append(f"weights {weights.get('num_bits')}-bit {weights.get('type')} "
                        f"(symmetric={weights.get('symmetric')}); supported: 8-bit int, symmetric")
    if weights.get("strategy") != "channel":
        problems.append(f"weights strategy {weights.get('strategy')!r}; supported: 'channel'")
    if inputs is not None and (inputs.get("num_bits"), inputs.get("type"), inputs.get("dynamic")) != (8, "int", True):
        problems.append(f"input_activations {inputs.get('num_bits')}-bit {inputs.get('type')} "
                        f"(dynamic={inputs.get('dynamic')}); supported: dynamic 8-bit int, or none")
    if problems:
        raise ModelLoadError(f"{path}: compressed-tensors config_groups.{name}: " + "; ".join(problems))
