"""Decoder-based sequence classifiers and reward models (transformers' *ForSequenceClassification
over Llama, Mistral, Qwen2, Qwen3): the causal decoder with a `score` head (hidden -> num_labels, no
bias) in place of lm_head. classify reads the last token's state (LAST, as transformers and vLLM
do); reward reads every token's (the Pooler applies the head row by row)."""

from __future__ import annotations

import torch

from sluice.layers.linear import Linear
from sluice.models.llama import LlamaForCausalLM
from sluice.models.mistral import MistralForCausalLM
from sluice.models.qwen2 import Qwen2ForCausalLM
from sluice.models.qwen3 import Qwen3ForCausalLM


class DecoderClassifierMixin:
    """Put before a *ForCausalLM among the bases: its decoder, transformers' score head."""

    classify_pooling = "LAST"
    tensor_parallel_unsupported = "pooling models are not split across ranks yet"
    supports_pipeline_parallel = False

    def __init__(self, config) -> None:
        super().__init__(config)
        del self.lm_head  # these checkpoints have none; a tied one shares embed_tokens and stays loaded
        self.tie_word_embeddings = False
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[n, hidden] final-normed states -> [n, num_labels] logits."""
        return self.score(pooled)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no language-model head: it classifies, it does not generate")


class LlamaForSequenceClassification(DecoderClassifierMixin, LlamaForCausalLM):
    pass


class MistralForSequenceClassification(DecoderClassifierMixin, MistralForCausalLM):
    pass


class Qwen2ForSequenceClassification(DecoderClassifierMixin, Qwen2ForCausalLM):
    pass


class Qwen3ForSequenceClassification(DecoderClassifierMixin, Qwen3ForCausalLM):
    pass
