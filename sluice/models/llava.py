"""LLaVA: a CLIP vision tower, a two-layer projector, and one of our decoders (Llama, Mistral,
Qwen2) with the engine's paged attention and plain 1-D positions.

An image becomes `length` embeddings (one per patch; the CLS token dropped by the "default"
feature strategy) taken from the tower's `vision_feature_layer` hidden states; the runner places
them at the image's placeholder tokens (`embed_images`, then `forward(inputs_embeds=...)`).
The vision tower is transformers' own CLIPVisionModel: it runs once per image, outside the paged
engine, so nothing about it needs our kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.models.registry import MODEL_REGISTRY
from sluice.models.vision_language import VisionLanguageModel

# text_config.model_type -> the registry's decoder
TEXT_MODELS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# checkpoint prefix -> ours: llava-hf checkpoints (transformers 4.x layout) and transformers 5's
_PREFIXES = (("language_model.model.", "language_model.model."), ("language_model.lm_head.", "language_model.lm_head."),
             ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
             ("vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
             ("vision_tower.", "vision_tower."),
             ("model.multi_modal_projector.", "multi_modal_projector."),
             ("multi_modal_projector.", "multi_modal_projector."))


class LlavaProjector(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        layers = config.vision_feature_layer
        num_layers = 1 if isinstance(layers, int) else len(layers)
        bias = getattr(config, "multimodal_projector_bias", True)
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_layers, hidden, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    tower_name = "vision_tower"
    prefixes = _PREFIXES

    def __init__(self, config) -> None:
        super().__init__()
        import transformers

        text_config = config.text_config
        if text_config.model_type not in TEXT_MODELS:
            raise ValueError(f"LlavaForConditionalGeneration: text_config.model_type={text_config.model_type!r} is "
                             f"not supported; supported: {', '.join(TEXT_MODELS)}")
        if config.vision_config.model_type != "clip_vision_model":
            raise ValueError(f"LlavaForConditionalGeneration: vision_config.model_type="
                             f"{config.vision_config.model_type!r} is not supported; supported: 'clip_vision_model'")
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"LlavaForConditionalGeneration: vision_feature_select_strategy="
                             f"{config.vision_feature_select_strategy!r} is not supported; supported: 'default', 'full'")
        self.config = config
        self.language_model = MODEL_REGISTRY[TEXT_MODELS[text_config.model_type]].model_class()(text_config)
        vision_config = config.vision_config
        vision_config._attn_implementation = "sdpa"
        self.vision_tower = transformers.CLIPVisionModel(vision_config)
        self.multi_modal_projector = LlavaProjector(config)
        self.feature_layers = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.image_token_id: int = config.image_token_id

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, patches, text hidden]: the embeddings each image's placeholders get."""
        dtype = next(self.vision_tower.parameters()).dtype
        states = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        layers = [self.feature_layers] if isinstance(self.feature_layers, int) else self.feature_layers
        features = torch.cat([states[i][:, 1:] if self.drop_cls else states[i] for i in layers], dim=-1)
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))
