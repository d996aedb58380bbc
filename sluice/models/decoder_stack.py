"""A Llama-shaped decoder stack in one native call (sluice/layers/csrc/decoder.c).

A decode step of a small model is mostly Python: each layer makes eight kernel calls (two norms,
four linear layers, rotary with the cache write, attention), each wrapped in module dispatch,
checks and ctypes, about as long as the kernels themselves for the default model. Where every
layer of a stack is plain, the whole stack runs in one call that makes the same kernel calls in
the same order on the same buffers, so its results are bit for bit those of the layer-by-layer
path. Plain means: RMSNorm, fused q/k/v with full rotary and no q/k norm, full attention on the
native backend (so the native kernels are built) over a model-dtype cache, a gated SiLU MLP,
linear layers on the packed bf16 or the GGUF kernels with no LoRA, no hooks (EAGLE reads hidden
states through them), one rank and one pipeline stage. Anything else runs layer by layer. Positions
don't matter: the stack takes each row's cos/sin from LlamaModel.forward, so M-RoPE (Qwen2-VL,
rows picked per frequency section) runs through it unchanged.

The stack holds the addresses of the layers' weights, so it is rebuilt whenever they move
(`attach_decoder_stacks` after loading and after sleep mode parks or restores them).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sluice.distributed import get_pp_group, get_tp_group
from sluice.layers import native
from sluice.layers.attention import AttentionMetadata
from sluice.layers.attention.native_backend import NativeBackend
from sluice.layers.linear import Linear
from sluice.layers.norm import RMSNorm
from sluice.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel
from sluice.quantization import gguf

logger = logging.getLogger(__name__)

# decoder.c's ways of storing a linear layer's weight
KIND_BF16_PANELS, KIND_GGUF, KIND_GGUF_REPACKED = 0, 1, 2


class NotPlain(Exception):
    """Why a stack can't run in one call (logged once)."""


def linear_kind(linear: Linear) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
    """(kind, GGML type, weight, float32 bias) of a linear layer the stack can run."""
    if linear.lora is not None:
        raise NotPlain("LoRA adapters")
    if linear.packed is not None:
        return KIND_BF16_PANELS, 0, linear.packed, linear.packed_bias
    method = linear.quant_method
    if isinstance(method, gguf.GGUFLinearMethod) and gguf.kernel_available():
        blocks = method.blocks(linear)
        kind = KIND_GGUF_REPACKED if gguf.is_repacked(blocks) else KIND_GGUF
        return kind, int(method.qtype), blocks, linear.kernel_bias
    raise NotPlain(f"linear layers on {method.describe()}")


def plain_layer(layer: nn.Module) -> tuple[list[torch.Tensor | None], list[int], float, float]:
    """A plain decoder layer's tensors in decoder.c's order (two norm weights, then each linear's
    weight and bias), its linears' (kind, GGML type) pairs, its norm eps and attention scale."""
    if type(layer) is not LlamaDecoderLayer:
        raise NotPlain(f"{type(layer).__name__} layers")
    if layer._forward_hooks or layer._forward_pre_hooks:
        raise NotPlain("hooks on decoder layers")
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not LlamaAttention or attn.q_norm is not None or attn.rotary_order is not None:
        raise NotPlain("q/k norms or partial rotary")
    if type(mlp) is not LlamaMLP or not mlp.fused_silu:
        raise NotPlain("a feed-forward block other than the gated SiLU MLP")
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(type(norm) is not RMSNorm or norm.weight.dtype != torch.bfloat16 for norm in norms):
        raise NotPlain("norms other than bf16 RMSNorm")
    if norms[0].eps != norms[1].eps:
        raise NotPlain("norms with different eps")
    params, backend = attn.attn.params, attn.attn.backend
    if params.sliding_window or params.logits_soft_cap or not isinstance(backend, NativeBackend) \
            or backend.kv_quant is not None:
        raise NotPlain("windowed or soft-capped attention, or attention off the native backend's bf16 cache")
    tensors: list[torch.Tensor | None] = [norm.weight for norm in norms]
    kinds: list[int] = []
    for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        kind, qtype, weight, bias = linear_kind(linear)
        tensors += [weight, bias]
        kinds += [kind, qtype]
    return tensors, kinds, norms[0].eps, params.scale


class DecoderStack:
    """The layers of one LlamaModel as decoder.c reads them."""

    def __init__(self, model: LlamaModel) -> None:
        if get_tp_group().world_size > 1 or get_pp_group().num_stages > 1:
            raise NotPlain("layers split across ranks")
        layers = [layer for _, layer in model.local_layers()]
        described = [plain_layer(layer) for layer in layers]
        if len({(eps, scale) for _, _, eps, scale in described}) != 1:
            raise NotPlain("layers with different norm eps or attention scale")
        first = layers[0].self_attn
        if len({layer.self_attn.attn.kv_group for layer in layers}) != 1:
            raise NotPlain("layers in several KV cache groups")
        self.num_layers = len(layers)
        self.kv_group = first.attn.kv_group
        self.eps, self.scale = described[0][2], described[0][3]
        self.shape = (first.o_proj.out_features, first.num_heads, first.num_kv_heads, first.head_dim,
                      layers[0].mlp.down_proj.in_features)
        self.pointers = torch.tensor([[0 if t is None else t.data_ptr() for t in tensors] for tensors, *_ in described],
                                     dtype=torch.int64)
        self.kinds = torch.tensor([kinds for _, kinds, _, _ in described], dtype=torch.int64)
        # GGUF blocks, one of each layout: from some number of rows the layer-by-layer path runs
        # them on dequantized bf16 panels instead (gguf.integer_kernel_serves), which the stack doesn't
        blocks = (t for tensors, kinds, _, _ in described for t, kind in zip(tensors[2::2], kinds[::2])
                  if kind != KIND_BF16_PANELS)
        self.gguf_layouts = list({gguf.is_repacked(b): b for b in blocks}.values())

    def serves(self, x: torch.Tensor) -> bool:
        """Whether this step's rows run through the stack: bf16 rows that every layer runs on the
        kernel the layer-by-layer path would pick for them."""
        rows = x.shape[0]
        return x.dtype == torch.bfloat16 and x.dim() == 2 and rows > 0 and all(
            gguf.integer_kernel_serves(rows, blocks) for blocks in self.gguf_layouts)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[torch.Tensor],
            meta: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden] after every layer (a new tensor)."""
        meta = meta.by_kv_group[self.kv_group]
        x = x.clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        table = meta.token_block_table.to(torch.int64).contiguous()
        seq_lens = meta.token_seq_lens.to(torch.int64).contiguous()
        caches = torch.tensor([cache.data_ptr() for cache in kv_caches], dtype=torch.int64)
        hidden, H, Hkv, D, inter = self.shape
        status = native.load_library().decoder_stack_bf16(
            x.data_ptr(), x.shape[0], self.num_layers, self.pointers.data_ptr(), self.kinds.data_ptr(),
            hidden, H, Hkv, D, inter, self.eps, self.scale, cos.data_ptr(), sin.data_ptr(), caches.data_ptr(),
            kv_caches[0].stride(0), kv_caches[0].shape[2], slots.data_ptr(), table.data_ptr(), table.shape[1],
            seq_lens.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"the native decoder stack failed ({status}) on {x.shape[0]} rows")
        return x


def attach_decoder_stacks(model: nn.Module) -> None:
    """Give every LlamaModel in `model` its one-call stack where its layers are plain (else
    none: layer by layer). Called once the model is final (LoRA and EAGLE hooks in place) and
    whenever its weights move."""
    for module in model.modules():
        if isinstance(module, LlamaModel):
            try:
                module.decoder_stack = DecoderStack(module)
            except NotPlain as why:
                module.decoder_stack = None
                logger.info("decoder layers run layer by layer (%s)", why)
            else:
                logger.info("decoder layers: %d in one native call per step", module.decoder_stack.num_layers)
