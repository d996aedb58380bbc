"""BERT and XLM-RoBERTa: encoder-only, bidirectional attention, no KV cache.

A step's tokens arrive as one flat batch of whole prompts (the scheduler never chunks them), so
a prompt starts wherever its position is 0; each layer runs one SDPA call per group of prompts
of equal length. Module names are Hugging Face's, so weights load by name (minus the `bert.` /
`roberta.` prefix a classification checkpoint adds). XLM-RoBERTa is the same network with
positions offset past its padding index and, for classification, RoBERTa's two-layer head.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers.linear import Linear, QKVLinear
from sluice.loader import copy_weight
from sluice.pooling.config import position_offset


def _activation(config) -> callable:
    act = getattr(config, "hidden_act", "gelu")
    table = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
             "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    if act not in table:
        raise ValueError(f"BERT: config field hidden_act={act!r} is not supported; supported: {', '.join(table)}")
    return table[act]


class BertEmbeddings(nn.Module):
    def __init__(self, config, offset: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_offset = offset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
             + self.token_type_embeddings(token_types))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Query, key and value as one fused matmul (`qkv`, loaded from the checkpoint's three)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.qkv = QKVLinear(config.hidden_size, self.num_heads, self.num_heads, self.head_dim, bias=True)

    def forward(self, x: torch.Tensor, segments: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Each prompt attends to all of itself; prompts of one length go through SDPA together,
        reading q, k and v in place in the fused output (strided views, no copies)."""
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.qkv.split(self.qkv(x)))
        if len(segments) == 1 and isinstance(rows := _rows(*segments[0]), slice) and rows == slice(0, len(x)):
            return self._attend(q, k, v, *segments[0])  # the whole step is one group: no scatter
        out = x.new_empty(x.shape)
        for length, starts in segments:
            out[_rows(length, starts)] = self._attend(q, k, v, length, starts)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, starts: list[int]) -> torch.Tensor:
        rows = _rows(length, starts)
        group = [t[rows].view(len(starts), length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*group).transpose(1, 2).reshape(len(starts) * length, -1)


class BertLayer(nn.Module):
    """Post-norm: x = LN(x + attn(x)); x = LN(x + mlp(x)). Submodules as Hugging Face names them."""

    def __init__(self, config):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(config)
        self.attention.output = nn.Module()
        self.attention.output.dense = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.attention.output.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.output = nn.Module()
        self.output.dense = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.output.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _activation(config)
        self.exact_gelu = self.act is F.gelu  # the linear layer may apply it in its output pass

    def forward(self, x: torch.Tensor, segments: list[tuple[int, list[int]]]) -> torch.Tensor:
        attn = self.attention
        x = attn.output.LayerNorm(attn.output.dense(attn.self(x, segments), residual=x))
        dense = self.intermediate.dense
        hidden = dense.gelu(x) if self.exact_gelu else self.act(dense(x))
        return self.output.LayerNorm(self.output.dense(hidden, residual=x))


_QKV_SHARD = re.compile(r"(.*\.attention\.self)\.(query|key|value)\.(weight|bias)$")


def _rows(length: int, starts: list[int]) -> slice | torch.Tensor:
    """The rows of prompts of one length: a slice (a view, no copy) when they sit back to back."""
    if starts[-1] - starts[0] == (len(starts) - 1) * length:
        return slice(starts[0], starts[-1] + length)
    return torch.cat([torch.arange(s, s + length) for s in starts])


def _segments(positions: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(length, start rows) of the step's prompts, grouped by length: a prompt starts at position 0."""
    starts = torch.nonzero(positions == 0).flatten().tolist()
    ends = starts[1:] + [len(positions)]
    groups: dict[int, list[int]] = {}
    for start, end in zip(starts, ends):
        groups.setdefault(end - start, []).append(start)
    return list(groups.items())


class BertModel(nn.Module):
    """The encoder; returns the last hidden states (what sentence-transformers pools)."""

    checkpoint_prefix = "bert."  # how a *ForSequenceClassification checkpoint nests this model
    pair_token_types = True  # RoBERTa's tokenizers give every token type 0, pairs too

    def __init__(self, config):
        super().__init__()
        self.embeddings = BertEmbeddings(config, position_offset(config))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.sep_token_id = config.sep_token_id  # splits a (query, document) pair into token types
        self.pair_token_types = self.pair_token_types and config.type_vocab_size > 1

    def token_types(self, input_ids: torch.Tensor, segments: list[tuple[int, list[int]]]) -> torch.Tensor:
        """0 up to a prompt's first [SEP], 1 after it: what the tokenizer gives a text pair."""
        types = torch.zeros_like(input_ids)
        if not self.pair_token_types or self.sep_token_id is None:
            return types
        for length, starts in segments:
            for start in starts:
                seps = torch.nonzero(input_ids[start : start + length] == self.sep_token_id).flatten()
                if len(seps):
                    types[start + int(seps[0]) + 1 : start + length] = 1
        return types

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches=None, meta=None) -> torch.Tensor:
        segments = _segments(positions)
        x = self.embeddings(input_ids, positions, self.token_types(input_ids, segments))
        for layer in self.encoder.layer:
            x = layer(x, segments)
        return x

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors by name; the encoder's pooler and an MLM head are not used."""
        params = dict(self.named_parameters())
        # a fused qkv parameter is pending until each of its three checkpoint tensors came
        pending = {n for n in params if ".qkv." not in n} | {
            n.replace(".qkv.", f".{shard}.") for n in params if ".qkv." in n for shard in ("query", "key", "value")}
        for name, tensor in weights:
            name = name.removeprefix(self.checkpoint_prefix)
            fused = _QKV_SHARD.match(name)
            if fused:  # attention.self.{query,key,value}.{weight,bias} -> its rows of attention.self.qkv
                prefix, shard, kind = fused.groups()
                self.get_submodule(f"{prefix}.qkv").load_shard(shard[0], kind, tensor)
                pending.discard(name)
                continue
            unused = name.startswith(("pooler.", "cls.", "lm_head.")) and name not in params
            if unused or name.endswith("position_ids"):
                continue
            if name not in params:
                raise ValueError(f"unexpected parameter {name!r} for {type(self).__name__}")
            copy_weight(params[name], tensor, name)
            pending.discard(name)
        if pending:
            raise ValueError(f"parameters never loaded: {', '.join(sorted(pending)[:10])}")


class BertForSequenceClassification(BertModel):
    """A cross-encoder: the [CLS] state through BERT's pooler (dense + tanh), then the classifier."""

    classify_pooling = "CLS"

    def __init__(self, config):
        super().__init__(config)
        self.pooler = nn.Module()
        self.pooler.dense = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.classifier = Linear(config.hidden_size, config.num_labels, bias=True)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler.dense(pooled)))


class XLMRobertaModel(BertModel):
    checkpoint_prefix = "roberta."
    pair_token_types = False


class XLMRobertaForSequenceClassification(XLMRobertaModel):
    """RoBERTa's head: [CLS] -> dense -> tanh -> out_proj."""

    classify_pooling = "CLS"

    def __init__(self, config):
        super().__init__(config)
        self.classifier = nn.Module()
        self.classifier.dense = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.classifier.out_proj = Linear(config.hidden_size, config.num_labels, bias=True)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(pooled)))
