"""EAGLE draft heads: one Llama decoder layer that reads the target model's hidden states.

EAGLE (Li et al., 2024) feeds the head, at position p, the target's final hidden state at p and the
embedding of token p + 1; the head's output stands for the target's hidden state at p + 1, so the
target's lm_head turns it into a guess for token p + 2, and feeding that output back (with the guessed
token) drafts further. EAGLE-3 reads three of the target's intermediate hidden states instead,
concatenated and projected by `fc`, and drafts over a reduced vocabulary mapped back by `d2t`.

Checkpoints in the EAGLE repository's layout load as they are: tensors named without a "model."
prefix (`fc`, `layers.0.*` or EAGLE-3's `midlayer.*`), `embed_tokens` optional (the target's is
shared when absent), no input norm before EAGLE-1's first layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sluice.layers.attention import AttentionMetadata
from sluice.layers.linear import Linear, QKVLinear
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import get_rope
from sluice.models.llama import DecoderOptions, LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

_OPTIONAL = ("embed_tokens.weight", "fc.bias")  # absent: the target's embeddings; no bias


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _eagle_names(weights: Iterable[tuple[str, torch.Tensor]], seen: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The EAGLE repository's tensor names (vLLM's converted heads add a "model." prefix)."""
    for name, tensor in weights:
        name = name.removeprefix("model.")
        seen.add(name)
        yield name, tensor


class _EagleHead(nn.Module):
    """What both heads share: loading, the target's embeddings when the checkpoint has none. On
    tensor-parallel ranks the layers split as the target's do; the head's own embedding and
    EAGLE-3's reduced lm_head stay whole on every rank (EAGLE-1 uses the target's lm_head)."""

    tie_word_embeddings = False
    tensor_parallel_unsupported: str | None = None
    vocab_parallel_weights: tuple[str, ...] = ()

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.head_dim = _head_dim(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = get_rope(config, self.head_dim)
        self.has_own_embeddings = True

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen: set[str] = set()
        LlamaForCausalLM.load_weights(self, _eagle_names(weights, seen), optional=_OPTIONAL)
        self.has_own_embeddings = "embed_tokens.weight" in seen

    def share_target_embeddings(self, target: nn.Module) -> None:
        """Use the target's token embeddings where the checkpoint brought none (most EAGLE heads)."""
        if not self.has_own_embeddings:
            self.embed_tokens = target.model.embed_tokens


class EagleLlamaForCausalLM(_EagleHead):
    """EAGLE-1: fc(embedding of token p+1, target hidden at p) -> Llama layers -> hidden at p+1."""

    def __init__(self, config) -> None:
        super().__init__(config)
        H = config.hidden_size
        self.fc = Linear(2 * H, H, bias=True)  # the EAGLE repository's heads have a bias; vLLM's none
        nn.init.zeros_(self.fc.bias)
        options = DecoderOptions()
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.head_dim, options, i, None)
                                    for i in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()  # fc's output goes straight in
        self.lm_head: nn.Module | None = None  # the target's, set by the proposer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """hidden: the target's final hidden states, or this head's own output when chaining."""
        x = self.fc(torch.cat((self.embed_tokens(input_ids), hidden), dim=-1))
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def draft_token_ids(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)


class Eagle3DecoderLayer(nn.Module):
    """EAGLE-3's one layer: attention over [norm(embedding), norm(hidden)] (twice the width), the
    residual stream carrying the hidden state."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        H, eps, options = config.hidden_size, config.rms_norm_eps, DecoderOptions()
        self.self_attn = LlamaAttention(config, head_dim, options, None)
        attn = self.self_attn  # this rank's heads
        attn.qkv_proj = QKVLinear(2 * H, attn.num_heads, attn.num_kv_heads, head_dim)
        self.mlp = LlamaMLP(config, options)
        self.input_layernorm = RMSNorm(H, eps)
        self.hidden_norm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        x = self.self_attn(x, cos, sin, kv_cache, meta, residual=hidden)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class Eagle3LlamaForCausalLM(_EagleHead):
    """EAGLE-3: fc(three target hidden states) -> one layer -> norm -> its own (reduced) lm_head."""

    def __init__(self, config) -> None:
        super().__init__(config)
        H = config.hidden_size
        target_hidden = getattr(config, "target_hidden_size", None) or H
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.fc = Linear(3 * target_hidden, H, bias=False)
        self.midlayer = Eagle3DecoderLayer(config, self.head_dim)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = Linear(H, self.draft_vocab_size, bias=False)
        # draft id -> target id is draft id + d2t[draft id] (the EAGLE-3 checkpoints' convention)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """hidden: the target's three hidden states side by side, or this head's own output."""
        if hidden.shape[-1] != self.config.hidden_size:
            hidden = self.fc(hidden)
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)
        (kv_cache,) = kv_caches
        return self.midlayer(self.embed_tokens(input_ids), hidden, cos, sin, kv_cache, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def draft_token_ids(self, logits: torch.Tensor) -> torch.Tensor:
        draft = logits.argmax(dim=-1)
        return draft + self.d2t[draft]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def without_vocab_maps():
            for name, tensor in weights:
                if name.endswith("d2t"):
                    self.d2t.copy_(tensor.to(torch.long))
                elif not name.endswith("t2d"):  # target -> draft membership: not needed to draft
                    yield name, tensor
        super().load_weights(without_vocab_maps())
