"""Llama, written to be read top to bottom. Mistral, Qwen2 and Qwen3 reuse it: they
differ only in the switches returned by `LlamaForCausalLM.layer_options`.

Module names mirror Hugging Face's, except that q/k/v and gate/up are fused into
`qkv_proj` and `gate_up_proj`; `load_weights` does that mapping.
"""

import logging
from collections.abc import Iterable

import torch
from torch import nn

from sluice.layers.attention import Attention, AttentionMetadata
from sluice.layers.linear import GateUpLinear, Linear, MergedLinear, QKVLinear
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import get_rope

logger = logging.getLogger(__name__)


class LlamaAttention(nn.Module):
    def __init__(self, config, head_dim: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, self.num_heads, self.num_kv_heads, head_dim, bias=qkv_bias)
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim)
        self.o_proj = Linear(self.num_heads * head_dim, config.hidden_size, bias=o_bias)
        # Qwen3: RMSNorm over head_dim of every q and k head, before rotary
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """residual + attention(x): the add is fused into o_proj."""
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            qkv = torch.cat((self.q_norm(q.reshape(T, H, D)).view(T, H * D),
                             self.k_norm(k.reshape(T, Hkv, D)).view(T, Hkv * D), v), dim=-1)
        return self.o_proj(self.attn(qkv, cos, sin, kv_cache, meta), residual=residual)


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool, intermediate_size: int | None = None):
        """intermediate_size defaults to the config's (a shared expert has its own)."""
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = GateUpLinear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) mlp(x): the gated activation is fused into gate_up_proj, the add into down_proj."""
        return self.down_proj(self.gate_up_proj.silu_and_mul(x), residual=residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, head_dim: int, options: dict, layer_idx: int):
        """options may replace the attention class ("attention_class") and build another
        feed-forward block per layer ("make_mlp"(config, layer_idx): mixture-of-experts models)."""
        super().__init__()
        attention_class = options.get("attention_class", LlamaAttention)
        self.self_attn = attention_class(config, head_dim, options["qkv_bias"], options["o_bias"], options["qk_norm"])
        make_mlp = options.get("make_mlp")
        self.mlp = make_mlp(config, layer_idx) if make_mlp else LlamaMLP(config, options["mlp_bias"])
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), x, cos, sin, kv_cache, meta)
        return self.mlp(self.post_attention_layernorm(x), x)


class LlamaModel(nn.Module):
    def __init__(self, config, head_dim: int, options: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, head_dim, options, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = get_rope(config, head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-op once the model is cast
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)


# checkpoint projection name -> (our fused module, shard)
_FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
          "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
# non-parameter buffers some checkpoints carry
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def sliding_window(config) -> int | None:
    """The config's attention window if any layer uses one (Mistral v0.1, Qwen with
    use_sliding_window), else None."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.model = LlamaModel(config, self.head_dim, self.layer_options(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not implemented: every layer attends to its full context. That equals the
        # windowed model only while sequences stay within the window, so the engine
        # should cap max_model_len at this value when it is set.
        self.sliding_window = sliding_window(config)
        if self.sliding_window is not None and self.sliding_window < config.max_position_embeddings:
            logger.warning("%s: sliding_window=%d is not implemented; attention covers the full context, "
                           "which matches the model only for sequences up to %d tokens",
                           type(self).__name__, self.sliding_window, self.sliding_window)

    @classmethod
    def layer_options(cls, config) -> dict:
        """Per-family switches; subclasses override."""
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(getattr(config, "mlp_bias", False)),
                "qk_norm": False}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Flat varlen batch [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model dtype; the sampler upcasts only when it needs float32."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors, fusing q/k/v and gate/up into their slices."""
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
                if tensor.shape != params[name].shape:
                    raise ValueError(f"shape mismatch for {hf_name!r}: expected {tuple(params[name].shape)}, "
                                     f"got {tuple(tensor.shape)}")
                params[name].copy_(tensor)
            else:
                try:
                    modules[name.rpartition(".")[0]].load_shard(shard, leaf, tensor)
                except ValueError as e:
                    raise ValueError(f"{hf_name!r}: {e}") from None
            pending.discard((name, shard))

        if pending:
            unfused = {v: k for k, v in _FUSED.items()}
            missing = sorted(n if s is None else n.replace(n.split(".")[-2], unfused[n.split(".")[-2], s])
                             for n, s in pending)
            raise ValueError(f"parameters never loaded: {', '.join(missing[:10])}"
                             + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
