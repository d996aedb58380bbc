"""Prompt text + images -> token ids with each image's placeholder run expanded, and the features
the worker needs (pixels, where the run is, the image's content hash, Qwen2-VL's patch grid). The
model folder's own transformers processor does the work (for Qwen2-VL its image processor, and
the expansion Qwen2VLProcessor makes), so the expansion and the pixels are exactly the model's.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from sluice.multimodal.inputs import MultiModalFeature
from sluice.multimodal.media import MediaError, load_image

DEFAULT_IMAGE_LIMIT = 999  # images per prompt without --limit-mm-per-prompt (vLLM's default)


def is_multimodal(hf_config) -> bool:
    return getattr(hf_config, "vision_config", None) is not None


def image_hash(image: Image.Image) -> str:
    """Content hash of the decoded pixels: the same picture sent twice (whatever its encoding or
    URL) hits the encoder and prefix caches."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def split_images(messages: list[dict], content_format: str, placeholder: str) -> tuple[list[dict], list[tuple[Any, str]]]:
    """Chat messages (content as OpenAI's parts) -> what the chat template sees, image parts as
    {"type": "image"} (the "string" content format: the placeholder text), and each image part's
    (url or PIL image, its field path)."""
    refs: list[tuple[Any, str]] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "image_pil"):
                param = f"messages.{i}.content.{j}.{kind}"
                value = part.get(kind)
                refs.append((value.get("url") if isinstance(value, dict) else value, param))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        if content_format == "string":
            parts = "\n".join(placeholder if p.get("type") == "image" else p.get("text", "") for p in parts)
        out.append({**message, "content": parts})
    return out, refs


class MultiModalProcessor:
    """The model's AutoProcessor with vLLM's per-prompt image limit. Qwen2-VL (images cut into a
    patch grid) uses the folder's image processor and the engine's tokenizer instead: transformers'
    Qwen2VLProcessor also builds a video processor, which needs torchvision."""

    def __init__(self, folder: str, hf_config, limit_mm_per_prompt: dict[str, int] | None,
                 allowed_media_domains: list[str] | None, tokenizer=None) -> None:
        import transformers

        self.image_token_id: int = hf_config.image_token_id
        self.merge_size: int | None = getattr(hf_config.vision_config, "spatial_merge_size", None)
        if self.merge_size is None:
            self.processor = transformers.AutoProcessor.from_pretrained(folder)
            self.tokenizer = self.processor.tokenizer
            self.image_processor = None
            self._chat_template = getattr(self.processor, "chat_template", None)
        else:
            self.processor = None
            self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(folder)
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
            self._chat_template = _folder_chat_template(folder)
        self.image_token: str = getattr(self.processor, "image_token", None) or \
            self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        # what stands for one image in prompt text (Qwen2-VL wraps its pad token in vision start/end)
        wrap = [getattr(hf_config, f"vision_{edge}_token_id", None) for edge in ("start", "end")]
        self.placeholder: str = self.image_token if None in wrap else \
            self.image_token.join(self.tokenizer.convert_ids_to_tokens(wrap))
        self.max_images = (limit_mm_per_prompt or {}).get("image", DEFAULT_IMAGE_LIMIT)
        self.allowed_media_domains = list(allowed_media_domains or [])

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def check_count(self, params: list[str]) -> None:
        """More images than --limit-mm-per-prompt: an error naming the first one over the limit."""
        if len(params) > self.max_images:
            raise MediaError(f"the prompt has {len(params)} images; at most {self.max_images} are allowed "
                             "per prompt (--limit-mm-per-prompt)", params[self.max_images])

    def load_images(self, refs: list[tuple[Any, str]]) -> list[Image.Image]:
        """URLs (or PIL images, offline) -> RGB images, after the count check."""
        self.check_count([param for _, param in refs])
        images = []
        for value, param in refs:
            if isinstance(value, Image.Image):
                images.append(value.convert("RGB"))
            else:
                images.append(load_image(value, self.allowed_media_domains, param))
        return images

    def process(self, text: str, images: list[Image.Image], add_special_tokens: bool,
                param: str = "prompt") -> tuple[list[int], list[MultiModalFeature]]:
        """Token ids with each `<image>` expanded, and one feature per image, in prompt order
        (the caller checked the count, naming its own fields)."""
        found = text.count(self.image_token)
        if found != len(images):
            raise MediaError(f"the prompt has {found} {self.image_token} placeholders for {len(images)} images",
                             param)
        if not images:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens), []
        if self.merge_size is None:
            out = self.processor(text=[text], images=images, add_special_tokens=add_special_tokens,
                                 return_tensors="np")
            token_ids = [int(t) for t in out["input_ids"][0]]
            pixels = list(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))
            grids = [None] * len(images)
            lengths = [token_ids.count(self.image_token_id) // len(images)] * len(images)
        else:
            token_ids, pixels, grids, lengths = self._process_grids(text, images, add_special_tokens)
        features, start = [], 0
        positions = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        for image, pixel_values, grid, length in zip(images, pixels, grids, lengths):
            run = positions[start:start + length]
            start += length
            if len(run) != length or run[-1] - run[0] != length - 1:
                raise MediaError("image placeholders are not contiguous runs after expansion", param)
            features.append(MultiModalFeature(image_hash(image), run[0], length, pixel_values.tobytes(),
                                              list(pixel_values.shape), grid))
        return token_ids, features

    def _process_grids(self, text: str, images: list[Image.Image], add_special_tokens: bool
                       ) -> tuple[list[int], list[np.ndarray], list[list[int]], list[int]]:
        """Qwen2-VL: each image's patches and (t, h, w) grid, and its placeholder repeated once per
        merged patch (t*h*w / merge_size**2), as Qwen2VLProcessor expands it."""
        out = self.image_processor(images=images, return_tensors="np")
        grids = [[int(v) for v in grid] for grid in out["image_grid_thw"]]
        patches = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
        sizes = [t * h * w for t, h, w in grids]
        pixels = np.split(patches, np.cumsum(sizes)[:-1])
        lengths = [size // self.merge_size ** 2 for size in sizes]
        pieces = text.split(self.image_token)
        text = pieces[0] + "".join(self.image_token * n + piece for n, piece in zip(lengths, pieces[1:]))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens), pixels, grids, lengths


def _folder_chat_template(folder: str) -> str | None:
    """A processor's chat template as model folders keep it (chat_template.json or .jinja)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)["chat_template"] if name.endswith(".json") else f.read()
    return None


def multimodal_processor(config, source, hf_config, tokenizer) -> MultiModalProcessor | None:
    """The processor of a vision-language model (None for a text-only one). Its chat template
    (llava-hf folders keep it with the processor) serves chats when the tokenizer has none."""
    if not is_multimodal(hf_config):
        return None
    mm = config.multimodal
    processor = MultiModalProcessor(source.path, hf_config, mm.limit_mm_per_prompt, mm.allowed_media_domains,
                                    tokenizer)
    if not getattr(tokenizer, "chat_template", None) and processor.chat_template:
        tokenizer.chat_template = processor.chat_template
    return processor
