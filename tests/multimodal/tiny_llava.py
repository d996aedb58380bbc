"""A tiny random LLaVA (CLIP vision tower + projector + Llama) saved as transformers saves it, with
a processor (CLIP image processor + the SmolLM2 tokenizer plus an `<image>` token), and images.
benchmarks/vision.py builds larger shapes with the same helpers."""

from __future__ import annotations

IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 patches: 16 image tokens per image (the CLS token is dropped)
IMAGE_TOKEN = "<image>"
# a LLaVA-style ChatML template: image parts become <image>, which the processor expands
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)


def tiny_llava_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    import tempfile

    import transformers

    from tests.utils import smollm2_tokenizer

    with tempfile.TemporaryDirectory() as folder:  # a copy: the shared tokenizer stays as it is
        smollm2_tokenizer().save_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       patch_size=patch_size, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
                                       image_token=IMAGE_TOKEN)


def tiny_llava_config(image_token_id: int, vision: dict = TINY_VISION, text: dict = TINY_TEXT,
                      image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    import transformers

    vision = transformers.CLIPVisionConfig(**vision, image_size=image_size, patch_size=patch_size)
    text = transformers.LlamaConfig(**text, vocab_size=image_token_id + 1, bos_token_id=1, eos_token_id=2,
                                    rope_theta=10000.0)
    return transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                    image_token_id=image_token_id, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default")


def save_tiny_llava(folder, vision: dict = TINY_VISION, text: dict = TINY_TEXT, image_size: int = IMAGE_SIZE,
                    patch_size: int = PATCH_SIZE, dtype=None) -> None:
    """Model (float32 safetensors unless dtype) and processor in one folder, as llava-hf
    checkpoints are; other shapes for benchmarks."""
    import torch
    import transformers

    processor = tiny_llava_processor(image_size, patch_size)
    config = tiny_llava_config(processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision, text, image_size,
                               patch_size)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).to(dtype or torch.float32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def make_image(seed: int, size: tuple[int, int] = (40, 48)):
    """A random RGB picture (not square: the processor resizes and crops it)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def data_url(image, kind: str = "png") -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=kind.upper())
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_chat(text: str, *urls: str) -> list[dict]:
    """One user turn: the text, then each image as an OpenAI image_url part."""
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def template_text(processor, messages: list[dict]) -> str:
    """What the chat template makes of OpenAI-shaped messages whose images are {"type": "image"}."""
    shown = [{**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
             for m in messages]
    return processor.tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
