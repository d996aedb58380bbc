"""A tiny random Qwen2-VL or Qwen2.5-VL (its vision tower + a Qwen2 decoder with M-RoPE) saved as
transformers saves it, with a processor (Qwen2-VL's image processor + the SmolLM2 tokenizer plus Qwen2-VL's
special tokens) and Qwen2-VL's chat-template shape. benchmarks/vision.py builds larger shapes with
the same helpers; the images and data URLs come from tiny_llava."""

from __future__ import annotations

SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PATCH_SIZE, MERGE_SIZE = 8, 2  # a 16x16 pixel cell per image token
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64  # small images: 4 to 16 image tokens each
# Qwen2-VL's template, shortened: image parts become <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # the placeholder a multi_modal_data prompt holds

TINY_VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2)
# head_dim 16: 8 rotary frequencies, split 2 (temporal) + 3 (height) + 3 (width)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def tiny_qwen2_vl_processors(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                             patch_size: int = PATCH_SIZE) -> tuple:
    """(image processor, tokenizer): what a Qwen2-VL folder holds. transformers' Qwen2VLProcessor
    itself can't be built here: it also builds a video processor, which needs torchvision."""
    import tempfile

    import transformers

    from tests.utils import smollm2_tokenizer

    with tempfile.TemporaryDirectory() as folder:  # a copy: the shared tokenizer stays as it is
        smollm2_tokenizer().save_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch_size,
        merge_size=MERGE_SIZE, temporal_patch_size=2)
    return image_processor, tokenizer


# Qwen2.5-VL's tower: windows of 32 pixels (2 x 2 merged tokens) in block 0, full attention in block 1
TINY_VISION_2_5 = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=32,
                       fullatt_block_indexes=[1])


def tiny_qwen2_vl_config(tokenizer, vision: dict = TINY_VISION, text: dict = TINY_TEXT,
                         patch_size: int = PATCH_SIZE, family: str = "qwen2_vl"):
    import transformers

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    prefix = "Qwen2VL" if family == "qwen2_vl" else "Qwen2_5_VL"
    text = getattr(transformers, f"{prefix}TextConfig")(**text, vocab_size=max(ids.values()) + 1, bos_token_id=1,
                                                        eos_token_id=2)
    out = dict(hidden_size=text.hidden_size) if family == "qwen2_vl" else dict(out_hidden_size=text.hidden_size)
    vision = getattr(transformers, f"{prefix}VisionConfig")(**vision, **out, patch_size=patch_size,
                                                            spatial_merge_size=MERGE_SIZE, temporal_patch_size=2)
    return getattr(transformers, f"{prefix}Config")(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])


def save_tiny_qwen2_vl(folder, vision: dict | None = None, text: dict = TINY_TEXT, min_pixels: int = MIN_PIXELS,
                       max_pixels: int = MAX_PIXELS, patch_size: int = PATCH_SIZE, dtype=None,
                       family: str = "qwen2_vl") -> None:
    """Model (float32 safetensors unless dtype) and processor files in one folder, as Qwen's
    checkpoints are; family "qwen2_vl" or "qwen2_5_vl"; other shapes for benchmarks."""
    import torch
    import transformers

    vision = vision or (TINY_VISION if family == "qwen2_vl" else TINY_VISION_2_5)
    image_processor, tokenizer = tiny_qwen2_vl_processors(min_pixels, max_pixels, patch_size)
    config = tiny_qwen2_vl_config(tokenizer, vision, text, patch_size, family)
    torch.manual_seed(0)
    model_class = transformers.Qwen2VLForConditionalGeneration if family == "qwen2_vl" \
        else transformers.Qwen2_5_VLForConditionalGeneration
    model = model_class(config).to(dtype or torch.float32)
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # with the chat template (chat_template.jinja)


def hf_inputs(processors: tuple, text: str, images: list, add_special_tokens: bool = True) -> dict:
    """What Qwen2VLProcessor would give transformers' model (it needs torchvision, absent here):
    the image processor's patches and grids, each placeholder repeated once per merged patch, and
    mm_token_type_ids marking the image tokens (transformers' M-RoPE reads them)."""
    import torch

    image_processor, tokenizer = processors
    inputs = {}
    if images:
        inputs = dict(image_processor(images=images, return_tensors="pt"))
        pad = "<|image_pad|>"
        counts = (inputs["image_grid_thw"].prod(-1) // MERGE_SIZE ** 2).tolist()
        pieces = text.split(pad)
        text = pieces[0] + "".join(pad * n + piece for n, piece in zip(counts, pieces[1:]))
    input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=add_special_tokens)])
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == image_token_id).int()}
