"""Architecture name (config.architectures) -> model class."""

from torch import nn

from sluice.models.llama import LlamaForCausalLM
from sluice.models.mistral import MistralForCausalLM
from sluice.models.qwen2 import Qwen2ForCausalLM
from sluice.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(config) -> type[nn.Module]:
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    name = ", ".join(architectures) if architectures else "<none: config.architectures is empty>"
    raise ValueError(f"unsupported architecture {name}; supported: {', '.join(MODEL_REGISTRY)}")
