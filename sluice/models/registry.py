"""The one list of architectures: config.architectures name -> where its model class lives and
how llama.cpp's converter lays it out in a GGUF file. The model runner, the config loader and
the GGUF weight reader all read it; nothing else lists architectures.

Adding an architecture (see README, "Adding an architecture"): write sluice/models/<family>.py
with a class that takes the transformers config (forward, compute_logits, load_weights: reuse
llama.py's pieces where the arithmetic is the same), then add one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    module: str  # under sluice.models; imported on first use
    class_name: str
    gguf: str | None = None  # llama.cpp's general.architecture; None: no GGUF support
    gguf_permuted_qk: bool = False  # the converter reordered Q/K rows for its rotary layout
    gguf_norm_offset: float = 0.0  # the converter stored every norm weight plus this (Gemma's 1 + w)
    gguf_experts: bool = False  # routed experts: the file has {arch}.expert_count (Mixtral is GGUF "llama")
    gguf_own_config: bool = False  # transformers reads no config from this GGUF: sluice builds it from the metadata

    def model_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(f"sluice.models.{self.module}"), self.class_name)


MODEL_REGISTRY: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", "LlamaForCausalLM", gguf="llama", gguf_permuted_qk=True),
    "MistralForCausalLM": Architecture("mistral", "MistralForCausalLM", gguf="llama", gguf_permuted_qk=True),
    "Qwen2ForCausalLM": Architecture("qwen2", "Qwen2ForCausalLM", gguf="qwen2"),
    "Qwen3ForCausalLM": Architecture("qwen3", "Qwen3ForCausalLM", gguf="qwen3"),
    "GemmaForCausalLM": Architecture("gemma", "GemmaForCausalLM", gguf="gemma", gguf_norm_offset=1.0,
                                     gguf_own_config=True),
    "Gemma2ForCausalLM": Architecture("gemma", "Gemma2ForCausalLM", gguf="gemma2", gguf_norm_offset=1.0),
    "Gemma3ForCausalLM": Architecture("gemma", "Gemma3ForCausalLM", gguf="gemma3", gguf_norm_offset=1.0),
    "Phi3ForCausalLM": Architecture("phi3", "Phi3ForCausalLM", gguf="phi3"),
    "GraniteForCausalLM": Architecture("granite", "GraniteForCausalLM", gguf="granite", gguf_permuted_qk=True,
                                       gguf_own_config=True),
    "Olmo2ForCausalLM": Architecture("olmo2", "Olmo2ForCausalLM", gguf="olmo2", gguf_own_config=True),
    "MixtralForCausalLM": Architecture("mixtral", "MixtralForCausalLM", gguf="llama", gguf_permuted_qk=True,
                                       gguf_experts=True, gguf_own_config=True),
    "Qwen2MoeForCausalLM": Architecture("qwen2_moe", "Qwen2MoeForCausalLM", gguf="qwen2moe", gguf_experts=True),
    "Qwen3MoeForCausalLM": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", gguf="qwen3moe", gguf_experts=True),
    "OlmoeForCausalLM": Architecture("olmoe", "OlmoeForCausalLM", gguf="olmoe", gguf_experts=True,
                                     gguf_own_config=True),
    "LlavaForConditionalGeneration": Architecture("llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": Architecture("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": Architecture("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "LlamaForSequenceClassification": Architecture("sequence_classification", "LlamaForSequenceClassification"),
    "MistralForSequenceClassification": Architecture("sequence_classification", "MistralForSequenceClassification"),
    "Qwen2ForSequenceClassification": Architecture("sequence_classification", "Qwen2ForSequenceClassification"),
    "Qwen3ForSequenceClassification": Architecture("sequence_classification", "Qwen3ForSequenceClassification"),
    "BertModel": Architecture("bert", "BertModel"),
    "BertForSequenceClassification": Architecture("bert", "BertForSequenceClassification"),
    "XLMRobertaModel": Architecture("bert", "XLMRobertaModel"),
    "XLMRobertaForSequenceClassification": Architecture("bert", "XLMRobertaForSequenceClassification"),
}

# draft heads for speculative_config's methods: chosen by the method, not by config.architectures
EAGLE_HEADS: dict[str, Architecture] = {
    "eagle": Architecture("llama_eagle", "EagleLlamaForCausalLM"),
    "eagle3": Architecture("llama_eagle", "Eagle3LlamaForCausalLM"),
}


def get_architecture(config) -> tuple[str, Architecture]:
    """The first of config.architectures that sluice implements; the error lists the supported ones."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return arch, MODEL_REGISTRY[arch]
    name = ", ".join(architectures) if architectures else "<none: config.architectures is empty>"
    raise ValueError(f"unsupported architecture {name}; supported: {', '.join(MODEL_REGISTRY)}")


def gguf_architecture_name(gguf_arch: str, has_experts: bool) -> str | None:
    """The registry's architecture for a GGUF file: the first entry with the file's
    general.architecture and, as one GGUF name covers dense and MoE models (llama, Mixtral), experts alike."""
    return next((name for name, entry in MODEL_REGISTRY.items()
                 if entry.gguf == gguf_arch and entry.gguf_experts == has_experts), None)


def get_model_class(config) -> type[nn.Module]:
    return get_architecture(config)[1].model_class()
