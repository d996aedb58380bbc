"""Llama, written to be read top to bottom. Mistral, Qwen2, Qwen3 and Phi-3 reuse it whole: they
differ only in the switches `decoder_options` returns and each layer's attention window
(`sliding_windows`). Gemma, Granite and OLMo2 reuse its attention, MLP and weight loading with
decoder layers of their own.

Module names mirror Hugging Face's, except that q/k/v and gate/up are fused into
`qkv_proj` and `gate_up_proj`; `load_weights` does that mapping.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sluice.distributed import get_pp_group, get_tp_group
from sluice.distributed.sharding import local_heads
from sluice.layers.activation import get_gated_activation, silu_and_mul
from sluice.layers.attention import Attention, AttentionMetadata
from sluice.layers.linear import GateUpLinear, MergedLinear, QKVLinear, RowParallelLinear
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import get_rope, rope_parameters, rotary_dim, rotary_order
from sluice.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from sluice.loader import copy_weight


@dataclass(frozen=True)
class DecoderOptions:
    """What a Llama-shaped family changes inside a decoder layer."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # RMSNorm on q and k before rotary: over each head's head_dim (Qwen3, Gemma 3), or over the
    # whole q and k projections (OLMo2)
    qk_norm: Literal["head", "full"] | None = None
    norm: type[nn.Module] = RMSNorm
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_logits_soft_cap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    act_field: str = "hidden_act"  # the config field naming the MLP's activation
    # another feed-forward block for some layers (mixture-of-experts models): make_mlp(config, layer_idx)
    make_mlp: Callable[[Any, int], nn.Module] | None = None


def refuse_unsupported(config, arch: str, field: str, supported: tuple) -> None:
    """Refuse a config value this implementation would compute wrongly, naming the field
    (a field the config lacks counts as its first supported value)."""
    value = getattr(config, field, supported[0])
    if value not in supported:
        raise ValueError(f"{arch}: config field {field}={value!r} is not supported; "
                         f"supported: {', '.join(map(repr, supported))}")


class LlamaAttention(nn.Module):
    """This rank's heads (all of them on one rank); o_proj sums the ranks' outputs."""

    def __init__(self, config, head_dim: int, options: DecoderOptions, sliding_window: int | None):
        super().__init__()
        tp = get_tp_group()
        H, Hkv, _ = local_heads(config.num_attention_heads, config.num_key_value_heads, tp.world_size, tp.rank)
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, H, Hkv, head_dim, bias=options.qkv_bias)
        self.attn = Attention(H, Hkv, head_dim, scale=options.attn_scale, sliding_window=sliding_window,
                              logits_soft_cap=options.attn_logits_soft_cap)
        self.o_proj = RowParallelLinear(H * head_dim, config.hidden_size, bias=options.o_bias)
        self.q_norm = self.k_norm = None
        self.qk_norm_full = options.qk_norm == "full"
        if options.qk_norm is not None:
            per_head = options.qk_norm == "head"
            self.q_norm = options.norm(head_dim if per_head else H * head_dim, config.rms_norm_eps)
            self.k_norm = options.norm(head_dim if per_head else Hkv * head_dim, config.rms_norm_eps)
        order = rotary_order(head_dim, rotary_dim(rope_parameters(config), head_dim), H, Hkv)
        self.register_buffer("rotary_order", order, persistent=False)  # partial rotary only

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) attention(x): the add is fused into o_proj."""
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            qkv = self.norm_qk(qkv)
        if self.rotary_order is not None:
            qkv = qkv.index_select(-1, self.rotary_order)
        return self.o_proj(self.attn(qkv, cos, sin, kv_cache, meta), residual=residual)

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        T, H, Hkv, D = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        if self.qk_norm_full and get_tp_group().world_size > 1:
            q, k = self.norm_qk_across_ranks(q, k)
        else:
            q = self.q_norm(q.reshape(T, -1, self.q_norm.weight.shape[0])).view(T, H * D)
            k = self.k_norm(k.reshape(T, -1, self.k_norm.weight.shape[0])).view(T, Hkv * D)
        return torch.cat((q, k, v), dim=-1)

    def norm_qk_across_ranks(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A q/k norm over the whole projection when this rank holds some of its heads: one
        all-reduce of the ranks' sums of squares. Every rank holds as many heads, and replicated KV
        heads are held equally often, so the sum over ranks / (ranks x local width) is the mean."""
        tp = get_tp_group()
        sums = torch.stack((q.float().square().sum(-1), k.float().square().sum(-1)), dim=-1)
        mean_square = tp.all_reduce(sums) / sums.new_tensor([q.shape[-1], k.shape[-1]]) / tp.world_size
        return (self.q_norm.forward_with_mean_square(q, mean_square[:, :1]),
                self.k_norm.forward_with_mean_square(k, mean_square[:, 1:]))


class LlamaMLP(nn.Module):
    def __init__(self, config, options: DecoderOptions, intermediate_size: int | None = None,
                 reduce_results: bool = True):
        """intermediate_size defaults to the config's (a shared expert has its own, and leaves its
        tensor-parallel sum to the all-reduce after the routed experts: reduce_results=False)."""
        super().__init__()
        hidden, inter, bias = config.hidden_size, intermediate_size or config.intermediate_size, options.mlp_bias
        inter //= get_tp_group().world_size  # column-parallel gate/up, row-parallel down
        self.act_and_mul = get_gated_activation(getattr(config, options.act_field), options.act_field)
        # silu runs fused into the packed gate_up kernel's epilogue; other activations after the matmul
        self.fused_silu = self.act_and_mul is silu_and_mul
        self.gate_up_proj = (GateUpLinear(hidden, inter, bias=bias) if self.fused_silu
                             else MergedLinear(hidden, {"gate": inter, "up": inter}, bias=bias))
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) mlp(x): the add is fused into down_proj."""
        hidden = self.gate_up_proj.silu_and_mul(x) if self.fused_silu else self.act_and_mul(self.gate_up_proj(x))
        return self.down_proj(hidden, residual=residual)


def feed_forward(config, options: DecoderOptions, layer_idx: int) -> nn.Module:
    """A layer's feed-forward block: options.make_mlp's, else the dense gated MLP."""
    return options.make_mlp(config, layer_idx) if options.make_mlp else LlamaMLP(config, options)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int, options: DecoderOptions, layer_idx: int, sliding_window: int | None):
        super().__init__()
        self.self_attn = LlamaAttention(config, head_dim, options, sliding_window)
        self.mlp = feed_forward(config, options, layer_idx)
        self.input_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class PPMissingLayer(nn.Module):
    """The place of a decoder layer another pipeline stage runs (no weights, never called)."""


class LlamaModel(nn.Module):
    """The decoder stack; on a pipeline stage, only its layers (the others are PPMissingLayer) run,
    between the previous stage's hidden states and the next one's."""

    decoder_layer: type[nn.Module] = LlamaDecoderLayer
    decoder_stack = None  # the layers in one native call, where they are plain (models/decoder_stack.py)

    def __init__(self, config, head_dim: int, options: DecoderOptions, sliding_windows: list[int | None]):
        super().__init__()
        # the activations' dtype (the model is built under it): a quantized embedding's weight holds blocks
        self.dtype = torch.get_default_dtype()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer = get_pp_group().layer_range(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            self.decoder_layer(config, head_dim, options, i, window) if self.start_layer <= i < self.end_layer
            else PPMissingLayer() for i, window in enumerate(sliding_windows))
        self.norm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def stage_input(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The embedded tokens (or the given embeddings) on the first stage, the previous stage's
        output on the others."""
        pp = get_pp_group()
        if pp.is_first:
            return self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return pp.recv((input_ids.shape[0], self.embed_tokens.embedding_dim), self.dtype)

    def stage_output(self, x: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states on the last stage; on the others, x goes to the next."""
        pp = get_pp_group()
        if pp.is_last:
            return self.norm(x)
        pp.send(x)
        return x

    def local_layers(self) -> list[tuple[int, nn.Module]]:
        """(index, layer) of the layers this stage runs."""
        return list(enumerate(self.layers))[self.start_layer : self.end_layer]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (a vision-language model's: image features at the image tokens) replaces
        the embedding of input_ids."""
        x = self.stage_input(input_ids, inputs_embeds)
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-op once the model is cast
        if self.decoder_stack is not None and self.decoder_stack.serves(x):
            x = self.decoder_stack.run(x, cos, sin, kv_caches, meta)
        else:
            x = self.run_layers(x, cos, sin, kv_caches, meta)
        return self.stage_output(x)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[torch.Tensor],
                   meta: AttentionMetadata) -> torch.Tensor:
        """This stage's decoder layers one by one."""
        for (_, layer), kv_cache in zip(self.local_layers(), kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return x


# checkpoint projection name -> (our fused module, shard)
_FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
          "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
# non-parameter buffers some checkpoints carry
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def window_on_every_layer(config) -> list[int | None]:
    """transformers' Mistral / Phi-3 rule: config.sliding_window (None: off) on every layer."""
    return [getattr(config, "sliding_window", None)] * config.num_hidden_layers


def windows_by_layer_type(config) -> list[int | None]:
    """transformers' Qwen2/Qwen3 rule: layers whose layer_types entry is "sliding_attention" use
    config.sliding_window (which their configs clear unless use_sliding_window), others none."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", False) else None
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


class LlamaForCausalLM(nn.Module):
    model_class: type[nn.Module] = LlamaModel
    checkpoint_fuses_projections = False  # checkpoints store q/k/v and gate/up separately
    tensor_parallel_unsupported: str | None = None  # why a family cannot be split across ranks
    supports_pipeline_parallel = True  # its decoder layers can be split into stages

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.check_config(config)
        self.num_layers = config.num_hidden_layers
        tp = get_tp_group()
        self.num_kv_heads = local_heads(config.num_attention_heads, config.num_key_value_heads, tp.world_size,
                                        tp.rank)[1]
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.model = self.model_class(config, self.head_dim, self.decoder_options(config),
                                      self.sliding_windows(config))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        """Per-family switches; subclasses override."""
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        """Each layer's attention window (None: full attention). transformers' Llama has none,
        whatever the config says; subclasses override."""
        return [None] * config.num_hidden_layers

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse config values that change the arithmetic in ways this file does not implement.
        (hidden_act, rope_type and partial_rotary_factor are checked where they are used.)"""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Flat varlen batch [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype; the sampler upcasts only when it needs float32."""
        return self.lm_head(hidden)

    def checkpoint_names(self) -> list[str]:
        """The Hugging Face tensor names of this model's checkpoints (lm_head's even when tied; fused
        modules under their projections' names unless the family's checkpoints fuse them too). The
        GGUF reader matches a file's tensors against these."""
        unfused = {v: k for k, v in _FUSED.items()}
        modules = dict(self.named_modules())
        names = []
        for name, _ in self.named_parameters(remove_duplicate=False):
            module_path, _, leaf = name.rpartition(".")
            owner = modules[module_path]
            if isinstance(owner, MergedLinear) and not self.checkpoint_fuses_projections:
                parent, _, fused = module_path.rpartition(".")
                names += [f"{parent}.{unfused[fused, shard]}.{leaf}" for shard in owner.shard_sizes]
            else:
                names.append(name)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], optional: tuple[str, ...] = ()) -> None:
        """Load Hugging Face-named tensors, fusing q/k/v and gate/up into their slices (a checkpoint
        that already fuses them, as Phi-3's does, fills the whole module at once). Parameters named
        in `optional` may be absent (they keep their initial values)."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())  # a tied lm_head.weight appears once, as embed_tokens
        pending: set[tuple[str, str | None]] = set()
        for name in params:
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, MergedLinear):
                pending.update((name, shard) for shard in owner.shard_sizes)
            else:
                pending.add((name, None))

        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if self.tie_word_embeddings and hf_name == "lm_head.weight":
                continue  # some tied checkpoints still store a copy
            prefix, _, leaf = hf_name.rpartition(".")
            module_path, _, proj = prefix.rpartition(".")
            shard = None
            if proj in _FUSED:
                fused, shard = _FUSED[proj]
                name = f"{module_path}.{fused}.{leaf}"
            else:
                name = hf_name
            if name not in params:
                raise ValueError(f"unexpected parameter {hf_name!r} for {type(self).__name__}")
            if shard is None:
                copy_weight(params[name], tensor, hf_name)
                owner = modules[name.rpartition(".")[0]]
                pending.difference_update((name, s) for s in getattr(owner, "shard_sizes", (None,)))
            else:
                try:
                    modules[name.rpartition(".")[0]].load_shard(shard, leaf, tensor)
                except ValueError as e:
                    raise ValueError(f"{hf_name!r}: {e}") from None
                pending.discard((name, shard))

        pending = {(name, shard) for name, shard in pending if name not in optional}
        if pending:
            unfused = {v: k for k, v in _FUSED.items()}
            missing = sorted(n if s is None else n.replace(n.split(".")[-2], unfused[n.split(".")[-2], s])
                             for n, s in pending)
            raise ValueError(f"parameters never loaded: {', '.join(missing[:10])}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
