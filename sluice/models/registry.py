"""Architecture name (config.architectures) -> model class."""

from torch import nn

from sluice.models.llama import LlamaForCausalLM
from sluice.models.mistral import MistralForCausalLM
from sluice.models.mixtral import MixtralForCausalLM
from sluice.models.olmoe import OlmoeForCausalLM
from sluice.models.qwen2 import Qwen2ForCausalLM
from sluice.models.qwen2_moe import Qwen2MoeForCausalLM
from sluice.models.qwen3 import Qwen3ForCausalLM
from sluice.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
}


def get_model_class(config) -> type[nn.Module]:
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    name = ", ".join(architectures) if architectures else "<none: config.architectures is empty>"
    raise ValueError(f"unsupported architecture {name}; supported: {', '.join(MODEL_REGISTRY)}")
