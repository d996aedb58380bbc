"""GGUF weights run as they are stored: each linear layer keeps its GGML blocks in memory.

The matmul is sluice/layers/csrc/quant.c where the CPU has AVX-512 VNNI (activations quantized
per row to int8, as llama.cpp does); elsewhere the layer's blocks are dequantized on the fly, one
layer at a time, and multiplied with F.linear (slow, but the memory stays that of the file).
A fused layer (q/k/v, gate/up) runs quantized when its checkpoint shards share one type; layers
in a type no kernel reads here load dequantized, and the load log names them. A mixture-of-experts
layer's experts (ffn_gate_exps / ffn_up_exps / ffn_down_exps) keep their blocks the same way, and
run in one native call (moe.c's moe_experts_gguf) over the touched experts.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from sluice.distributed import get_tp_group
from sluice.layers import native
from sluice.layers.linear import RowParallelLinear
from sluice.layers.vocab_parallel import VocabParallelEmbedding
from sluice.platform import cpu_flags
from sluice.layers.activation import silu_and_mul
from sluice.quantization.base import LinearMethod, MoEMethod, QuantizationConfig

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# The types quant.c reads; the portable path reads these too.
KERNEL_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
_DENSE_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
_KERNEL_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"}
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
# From this many rows of x, dequantizing the weight to bf16 panels beats the integer kernel on
# blocks as stored (which unpacks each block once per 4 rows); measured on an AMD EPYC (Zen 4).
MANY_ROWS = 16
# Repacked blocks (below) stay on the integer kernel for every batch: 2.6x the bf16 kernel's speed
# at 256 rows (Intel Xeon, no AMX). Tests lower it to run the same weights in bf16 arithmetic.
MANY_ROWS_REPACKED = 1 << 62
# Types quant.c repacks at load into its interleaved layout (16 weight rows per register, the
# file's bytes in another order), which its integer kernel reads for decode and prefill alike.
REPACKED_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0})


@functools.cache
def kernel_available() -> bool:
    """Whether quant.c's VNNI kernel runs on this CPU."""
    return _KERNEL_FLAGS <= cpu_flags() and native.load_library() is not None


def integer_kernel_serves(rows: int, blocks: torch.Tensor) -> bool:
    """Whether a product of this many rows runs on the integer kernel (else on bf16 panels, the
    weight dequantized per call: `gguf_linear_many_rows`)."""
    return rows < (MANY_ROWS_REPACKED if is_repacked(blocks) else MANY_ROWS)


def row_bytes(qtype: Q, in_features: int) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return in_features // block_size * type_size


def is_repacked(blocks: torch.Tensor) -> bool:
    return getattr(blocks, "gguf_repacked", False)


def repack(blocks: torch.Tensor, qtype: Q) -> torch.Tensor | None:
    """GGML blocks [N, row bytes] -> quant.c's interleaved layout [N rounded up to 16, row bytes],
    flagged for gguf_linear; None where it doesn't apply (another type, no kernel here)."""
    if qtype not in REPACKED_TYPES or not kernel_available() or blocks.device.type != "cpu":
        return None
    lib = native.load_library()
    n, in_features = blocks.shape[0], blocks.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    packed = torch.empty(-(-n // 16) * 16, blocks.shape[1], dtype=torch.uint8)
    if lib.repacked_gguf_bytes(int(qtype), n, in_features) != packed.numel() or \
            lib.repack_gguf(blocks.contiguous().data_ptr(), int(qtype), n, in_features, packed.data_ptr()) != 0:
        return None
    packed.gguf_repacked = True
    return packed


def repack_parameter(param: nn.Parameter, qtype: Q) -> None:
    """Repack a layer's blocks in place, once (a tied lm_head and its embedding share them)."""
    if not is_repacked(param) and (packed := repack(param.data, qtype)) is not None:
        param.data = packed
        param.gguf_repacked = True


def repacked_rows(blocks: torch.Tensor, qtype: Q, ids: torch.Tensor, in_features: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Rows ids of a repacked weight, dequantized -> [len(ids), in_features] (float32 or bf16)."""
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    out_dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    out = torch.empty(ids.numel(), in_features, dtype=out_dtype)
    status = native.load_library().gguf_x16_rows(blocks.data_ptr(), int(qtype), blocks.shape[0], in_features,
                                                 ids.data_ptr(), ids.numel(), out.data_ptr(),
                                                 int(out_dtype == torch.bfloat16))
    if status != 0:
        raise IndexError(f"token ids outside the embedding's {blocks.shape[0]} rows")
    return out.to(dtype)


def as_stored(blocks: torch.Tensor, qtype: Q, out_features: int) -> torch.Tensor:
    """A layer's blocks in the file's layout [N, row bytes] (a copy where they were repacked)."""
    if not is_repacked(blocks):
        return blocks
    stored = torch.empty(out_features, blocks.shape[1], dtype=torch.uint8)
    in_features = blocks.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    native.load_library().unrepack_gguf(blocks.data_ptr(), int(qtype), out_features, in_features, stored.data_ptr())
    return stored


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: Q, out_features: int, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] @ W^T (+ bias, float32, + residual) with W [N, K] as GGML blocks (uint8 [N, row
    bytes], or repacked by `repack`), by quant.c, rounded once; None where the kernel can't serve
    the call (no kernel here, another device or dtype)."""
    # every call of every quantized layer passes here (121 per decode step of the default model):
    # the checks are ordered to be cheap
    repacked = is_repacked(blocks)  # implies the kernel runs here
    if not x.is_cpu or x.dtype not in _KERNEL_DTYPES or not (repacked or kernel_available()):
        return None
    shape = x.shape
    if len(shape) != 2:
        x = x.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    if residual is not None:
        residual = residual.reshape(-1, out_features)
        if residual.dtype != x.dtype or residual.stride(-1) != 1:
            residual = residual.to(x.dtype).contiguous()
    out = torch.empty((rows, out_features), dtype=x.dtype)
    lib = native.load_library()
    status = (lib.linear_gguf_x16 if repacked else lib.linear_gguf)(
        x.data_ptr(), rows, shape[-1], x.stride(0), x.dtype == torch.bfloat16, blocks.data_ptr(), qtype,
        out_features, None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), out.data_ptr(), out_features)
    if status != 0:
        return None
    return out if len(shape) == 2 else out.view(*shape[:-1], out_features)


def gguf_linear_many_rows(x: torch.Tensor, blocks: torch.Tensor, qtype: Q, out_features: int,
                          bias: torch.Tensor | None) -> torch.Tensor | None:
    """The same product for many rows of bf16 x: the weight dequantized into the bf16 kernel's
    panels (one pass over the blocks), then gemm.c's register tiles; None where that can't run."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or "avx512_bf16" not in cpu_flags():
        return None
    lib = native.load_library()
    in_features = x.shape[-1]
    blocks = as_stored(blocks, qtype, out_features)
    packed = torch.empty(-(-out_features // native.PANEL) * native.PANEL * in_features, dtype=torch.bfloat16)
    if lib is None or lib.dequant_pack_gguf(blocks.data_ptr(), int(qtype), out_features, in_features,
                                            packed.data_ptr()) != 0:
        return None
    return native.linear(x, packed, out_features, bias)


def dequantize(blocks: torch.Tensor, qtype: Q, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] of GGML blocks, by the gguf package (the reference)."""
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)).to(dtype)


def gguf_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, gate_up_type: Q,
             down: torch.Tensor, down_type: Q) -> torch.Tensor | None:
    """Routed experts over GGML blocks, gate_up uint8 [E, 2I, row bytes of H] and down [E, H, row
    bytes of I], in one call of moe.c; None where the kernel can't serve the call."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or not kernel_available():
        return None
    x, ids, weights = x.contiguous(), ids.to(torch.int64).contiguous(), weights.float().contiguous()
    (T, top_k), H, (E, I2, _) = ids.shape, x.shape[1], gate_up.shape
    scratch = x.new_empty(T * top_k * (2 * H + 3 * I2 // 2))
    out = torch.empty_like(x)
    status = native.load_library().moe_experts_gguf(
        x.data_ptr(), int(x.dtype == torch.bfloat16), T, H, I2 // 2, top_k, ids.data_ptr(), weights.data_ptr(), E,
        gate_up.data_ptr(), gate_up.stride(0), int(gate_up_type), down.data_ptr(), down.stride(0), int(down_type),
        scratch.data_ptr(), out.data_ptr())
    return out if status == 0 else None


class GGUFMoEMethod(MoEMethod):
    """A layer's experts as GGML blocks: gate_up [E, 2I, row bytes] (gate and up share a type),
    down [E, H, row bytes]."""

    def __init__(self, gate_up_type: Q, down_type: Q) -> None:
        self.gate_up_type, self.down_type = gate_up_type, down_type

    def create_weights(self, experts: nn.Module) -> None:
        E, H, I = experts.num_experts, experts.hidden_size, experts.intermediate_size
        experts.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, row_bytes(self.gate_up_type, H), dtype=torch.uint8),
                                            requires_grad=False)
        experts.down_proj = nn.Parameter(torch.empty(E, H, row_bytes(self.down_type, I), dtype=torch.uint8),
                                         requires_grad=False)

    def blocks(self, experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return experts.gate_up_proj, experts.down_proj

    def apply(self, experts: nn.Module, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.blocks(experts)
        out = gguf_moe(x, weights, ids, gate_up, self.gate_up_type, down, self.down_type)
        if out is not None:
            return out

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:  # dequantized per call: no kernel here
            h = silu_and_mul(F.linear(rows, dequantize(gate_up[e], self.gate_up_type, rows.dtype)))
            return F.linear(h, dequantize(down[e], self.down_type, rows.dtype))

        return experts.grouped(x, weights, ids, expert)

    def describe(self) -> str:
        types = " / ".join(dict.fromkeys(t.name for t in (self.gate_up_type, self.down_type)))
        return f"GGUF {types} ({'VNNI kernel' if kernel_available() else 'dequantized per call'})"


class GGUFLinearMethod(LinearMethod):
    def __init__(self, qtype: Q) -> None:
        self.qtype = qtype

    def create_weights(self, layer: nn.Module) -> None:
        shape = (layer.out_features, row_bytes(self.qtype, layer.in_features))
        layer.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        repack_parameter(self.blocks(layer), self.qtype)  # the kernel's interleaved layout, where it runs
        layer.kernel_bias = None if layer.bias is None else layer.bias.detach().float()  # what quant.c adds

    def blocks(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight

    def apply_residual(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        blocks, bias = self.blocks(layer), layer.kernel_bias
        out = None
        if not integer_kernel_serves(x.numel() // x.shape[-1], blocks):
            out = gguf_linear_many_rows(x, blocks, self.qtype, layer.out_features, bias)
        if out is None:
            out = gguf_linear(x, blocks, self.qtype, layer.out_features, bias, residual)
            if out is not None:
                return out
            weight = dequantize(as_stored(blocks, self.qtype, layer.out_features), self.qtype, x.dtype)
            out = F.linear(x, weight, layer.bias)
        return out if residual is None else residual + out

    apply = apply_residual

    def describe(self) -> str:
        return f"GGUF {self.qtype.name} ({'VNNI kernel' if kernel_available() else 'dequantized per call'})"


class TiedHeadMethod(GGUFLinearMethod):
    """An lm_head tied to the embedding, which the file stores once (token_embd): its weight is
    the embedding's blocks already."""

    def create_weights(self, layer: nn.Module) -> None:
        pass


class GGUFEmbedding(nn.Embedding):
    """An embedding whose table stays in GGML blocks: the rows looked up are dequantized."""

    qtype: Q
    out_dtype: torch.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if is_repacked(self.weight):  # by a tied lm_head
            rows = repacked_rows(self.weight, self.qtype, input_ids, self.embedding_dim, self.out_dtype)
        else:
            rows = dequantize(self.weight[input_ids.reshape(-1)], self.qtype, self.out_dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)


class GGUFConfig(QuantizationConfig):
    """Linear layers of a GGUF file keep the file's blocks (`--quantization gguf`, the default
    for .gguf models)."""

    name = "gguf"

    def __init__(self, path: str, hf_config) -> None:
        self.tensor_types = read_tensor_types(path, hf_config)  # Hugging Face weight name -> its GGML type
        self.quantized: set[str] = set()
        self.dequantized: Counter[str] = Counter()

    def prepare_model(self, model: nn.Module) -> None:
        """The embedding keeps its blocks too (and so does an lm_head tied to it)."""
        qtype = self.tensor_types.get(EMBEDDING)
        embedding = model.get_submodule(EMBEDDING.rpartition(".")[0])
        if qtype not in KERNEL_TYPES or type(embedding) not in (nn.Embedding, VocabParallelEmbedding):
            return
        if get_tp_group().world_size > 1:
            return  # split by vocabulary, each rank looks up its rows: dense (dequantized) there
        dense = embedding.weight
        blocks = nn.Parameter(torch.empty(dense.shape[0], row_bytes(qtype, dense.shape[1]), dtype=torch.uint8),
                              requires_grad=False)
        for module in model.modules():
            if module._parameters.get("weight") is dense:  # the embedding, and a tied lm_head
                module.weight = blocks
        embedding.__class__ = GGUFEmbedding
        embedding.qtype, embedding.out_dtype = qtype, dense.dtype
        self.quantized.add(EMBEDDING)

    def get_linear_method(self, layer: nn.Module, checkpoint_names: list[str]) -> LinearMethod | None:
        if checkpoint_names == [HEAD] and HEAD not in self.tensor_types:
            tied = EMBEDDING in self.quantized and layer.weight.dtype == torch.uint8
            return TiedHeadMethod(self.tensor_types[EMBEDDING]) if tied else None
        types = {self.tensor_types.get(name) for name in checkpoint_names}
        if None in types or types <= _DENSE_TYPES:
            return None  # not in the file or stored dense
        qtype = types.pop()
        if not types and qtype in KERNEL_TYPES and isinstance(layer, RowParallelLinear):
            check_split(checkpoint_names[0], layer.in_features, qtype)
        if types or qtype not in KERNEL_TYPES or layer.in_features % gguf.GGML_QUANT_SIZES[qtype][0]:
            self.dequantized[" + ".join(sorted(t.name for t in types | {qtype}))] += 1
            return None
        self.quantized.update(checkpoint_names)
        return GGUFLinearMethod(qtype)

    def get_moe_method(self, experts: nn.Module, checkpoint_names: list[str]) -> MoEMethod | None:
        """Blocks as stored when gate and up share a type and the kernel reads every projection's;
        else the experts load dequantized (named in the load log)."""
        types = [self.tensor_types.get(name) for name in checkpoint_names]  # gate, up, down
        if None in types or set(types) <= _DENSE_TYPES:
            return None
        gate, up, down = types
        if down in KERNEL_TYPES:
            check_split(checkpoint_names[2], experts.intermediate_size, down)
        fits = all(t in KERNEL_TYPES and size % gguf.GGML_QUANT_SIZES[t][0] == 0
                   for t, size in ((gate, experts.hidden_size), (down, experts.intermediate_size)))
        if gate != up or not fits:
            self.dequantized["experts " + " / ".join(t.name for t in types)] += 1
            return None
        self.quantized.update(checkpoint_names)
        return GGUFMoEMethod(gate, down)

    def raw_weight_names(self) -> set[str]:
        return self.quantized

    def stored_block(self, name: str) -> tuple[int, int] | None:
        return gguf.GGML_QUANT_SIZES[self.tensor_types[name]] if name in self.quantized else None

    def log_summary(self) -> None:
        if self.dequantized:
            logger.info("GGUF: layers loaded dequantized (types no kernel reads, or mixed types in one "
                        "fused layer): %s", ", ".join(f"{n} x {t}" for t, n in sorted(self.dequantized.items())))


def check_split(name: str, share: int, qtype: Q) -> None:
    """Refuse a layer whose inputs tensor-parallel ranks split (o, down) into shares that are not
    whole blocks of its type (each rank keeps the file's blocks as they are)."""
    tp, values = get_tp_group(), gguf.GGML_QUANT_SIZES[qtype][0]
    if tp.world_size > 1 and share % values:
        raise ValueError(f"quantization='gguf' (--quantization) with tensor_parallel_size={tp.world_size}: {name} "
                         f"({qtype.name}) splits its {share * tp.world_size} inputs into shares of {share}, not "
                         f"whole blocks of {values}; use fewer ranks or quantization 'none' (dequantized)")


def read_tensor_types(path: str, hf_config) -> dict[str, Q]:
    """Hugging Face weight name -> GGML type of every tensor of a GGUF file."""
    from sluice.loader.gguf import gguf_architecture, hf_names, open_gguf

    reader = open_gguf(path)
    names = hf_names(hf_config, gguf_architecture(reader, path))
    # tensors without a name here are reported by the weight loader
    return {names[tensor.name]: Q(tensor.tensor_type) for tensor in reader.tensors if tensor.name in names}


def requantize_file(source: str, target: str, qtype: Q) -> None:
    """A copy of a GGUF file with every block-quantized tensor requantized to `qtype` (metadata and
    dense tensors as they are): a Q8_0 twin of a Q4_1 model, for tests and benchmarks."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, str(reader.get_field("general.architecture").contents()))
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        if tensor.tensor_type in _DENSE_TYPES:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        else:
            dense = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, gguf.quants.quantize(dense, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
