"""Qwen2-VL and Qwen2.5-VL: a ViT over patch grids (transformers' own vision tower of each) and our
Qwen2 decoder with the engine's paged attention and M-RoPE. The two differ only in the tower
(Qwen2.5-VL's attends within windows in most blocks and uses RMSNorm and a gated MLP); their
placeholders, M-RoPE for images and checkpoint layouts are the same.

An image of (t, h, w) patches (t = 1 for a still image: the processor repeats it over the
temporal_patch_size frames the Conv3d patch embedding reads) becomes t*h*w / merge**2 embeddings,
one per `<|image_pad|>` placeholder: each block attends within its own image only, and the
PatchMerger folds merge x merge neighbouring patches into one token of the decoder's width.

M-RoPE: every prompt token has a (temporal, height, width) position. Text runs on with three equal
positions; an image's tokens take their grid indices, offset by the position where the image
starts, and the text after it continues from that start + max(h, w) / merge. Generated tokens sit
at their index plus the request's `delta` (the prompt's largest position + 1 - its length), so the
runner computes any token's position from the request alone (mrope_positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sluice.models.qwen2 import Qwen2ForCausalLM
from sluice.models.vision_language import VisionLanguageModel
from sluice.multimodal.inputs import MultiModalFeature

# checkpoint prefix -> ours: transformers 5's layout, then the original Qwen/Qwen2-VL-*-Instruct one
_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model.model."),
             ("visual.", "visual."), ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    tower_name = "visual"
    prefixes = _PREFIXES
    uses_mrope = True  # the runner passes positions [3, T] (mrope_positions)

    @staticmethod
    def vision_tower_class() -> type[nn.Module]:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel

    def __init__(self, config) -> None:
        super().__init__()
        text_config = config.text_config
        if getattr(text_config, "tie_word_embeddings", None) is None:
            text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not (getattr(text_config, "rope_parameters", None) or {}).get("mrope_section"):
            raise ValueError(f"{type(self).__name__}: text_config.rope_parameters needs mrope_section")
        self.config = config
        self.language_model = Qwen2ForCausalLM(text_config)
        vision_config = config.vision_config
        vision_config._attn_implementation = "sdpa"
        self.visual = self.vision_tower_class()(vision_config)
        self.merge_size: int = vision_config.spatial_merge_size
        self.image_token_id: int = config.image_token_id

    def embed_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Sequence[torch.Tensor]:
        """Patches of several images [sum of t*h*w, C*T*P*P] and their grids [N, 3] -> each
        image's embeddings [t*h*w / merge**2, text hidden]."""
        dtype = self.visual.patch_embed.proj.weight.dtype
        merged = self.visual(pixel_values.to(dtype), grid_thw=grid_thw).pooler_output
        return merged.split((grid_thw.prod(-1) // self.merge_size ** 2).tolist())

    def mrope_positions(self, num_prompt_tokens: int, features: list[MultiModalFeature]) -> tuple[torch.Tensor, int]:
        """The prompt's M-RoPE positions [3, num_prompt_tokens] from where its images sit and their
        grids, and the delta that later tokens add to their index."""
        runs, cursor, start = [], 0, 0  # cursor: next prompt index; start: next position
        for feature in sorted(features, key=lambda f: f.offset):
            text = feature.offset - cursor
            runs.append(torch.arange(start, start + text).expand(3, -1))
            start += text
            t, h, w = feature.grid_thw
            h, w = h // self.merge_size, w // self.merge_size
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            runs.append(grid.reshape(3, -1) + start)
            start += max(h, w)
            cursor = feature.offset + feature.length
        runs.append(torch.arange(start, start + num_prompt_tokens - cursor).expand(3, -1))
        positions = torch.cat(runs, dim=1)
        return positions, int(positions.max()) + 1 - num_prompt_tokens


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    @staticmethod
    def vision_tower_class() -> type[nn.Module]:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel
