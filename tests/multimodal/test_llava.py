"""LLaVA offline: greedy parity with transformers (float32) for images in prompts and in chats,
prefill chunks that cut through an image's placeholders, and the encoder / prefix caches keyed on
the image's content."""

import pytest

from sluice.entrypoints.llm import LLM
from sluice.multimodal.media import MediaError
from sluice.sampling_params import SamplingParams
from tests.multimodal.tiny_llava import data_url, image_chat, make_image, template_text

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def llm(llava_dir):
    # 4-token blocks and 7-token prefill chunks: each image's 16 placeholders span several of both
    return LLM(llava_dir, dtype="float32", block_size=4, max_num_batched_tokens=32, long_prefill_token_threshold=7,
               kv_cache_memory_bytes=1 << 22, limit_mm_per_prompt={"image": 2})


def test_generate_with_images_matches_transformers(llm, hf_greedy):
    one, two = make_image(1), make_image(2, size=(64, 30))
    prompts = [
        {"prompt": "Look: <image>\nWhat is it?", "multi_modal_data": {"image": one}},
        {"prompt": "<image> or <image>, which one?", "multi_modal_data": {"image": [two, one]}},
        "A plain text prompt",
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == hf_greedy(prompts[0]["prompt"], [one], MAX_TOKENS)
    assert outputs[1].outputs[0].token_ids == hf_greedy(prompts[1]["prompt"], [two, one], MAX_TOKENS)
    assert outputs[2].outputs[0].token_ids == hf_greedy(prompts[2], [], MAX_TOKENS)


def test_chat_with_image_parts_matches_transformers(llm, hf_llava, hf_greedy):
    image = make_image(3)
    messages = image_chat("What is in this picture?", data_url(image))
    [out] = llm.chat(messages, GREEDY, use_tqdm=False)
    text = template_text(hf_llava[1], messages)
    assert out.outputs[0].token_ids == hf_greedy(text, [image], MAX_TOKENS, add_special_tokens=False)
    # vLLM's image_pil part: the same picture, the same answer
    pil = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                        {"type": "image_pil", "image_pil": image}]}]
    assert llm.chat(pil, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_caches_key_on_the_image_content(llm, hf_greedy):
    """A repeated image hits the prefix cache through its placeholders and, placed after other
    text, the encoder cache; another image with the same text shares no block past the text."""
    first, other = make_image(4), make_image(5)
    prompt = "Describe <image>\nin one word"
    assert llm.reset_prefix_cache()
    before = llm.get_metrics()
    a = llm.generate({"prompt": prompt, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt": prompt, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    moved = llm.generate({"prompt": "So: " + prompt, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    swapped = llm.generate({"prompt": prompt, "multi_modal_data": {"image": other}}, GREEDY, use_tqdm=False)[0]
    after = llm.get_metrics()

    image_start = a.prompt_token_ids.index(llm.input_processor.mm_processor.image_token_id)
    assert again.num_cached_tokens >= image_start + 16  # the blocks holding the image's placeholders
    assert again.outputs[0].token_ids == a.outputs[0].token_ids
    assert swapped.num_cached_tokens <= image_start  # only the text before the image is shared
    assert swapped.outputs[0].token_ids == hf_greedy(prompt, [other], MAX_TOKENS)
    assert moved.outputs[0].token_ids == hf_greedy("So: " + prompt, [first], MAX_TOKENS)
    # encoder runs: first (miss), moved (hit: same picture, new prefix), swapped (miss); `again` needs none
    assert after["vllm:mm_cache_queries"] - before.get("vllm:mm_cache_queries", 0) == 3
    assert after["vllm:mm_cache_hits"] - before.get("vllm:mm_cache_hits", 0) == 1


def test_bad_image_inputs_name_the_field(llm):
    image = make_image(6)
    with pytest.raises(MediaError, match="at most 2") as info:
        llm.generate({"prompt": "<image><image><image>", "multi_modal_data": {"image": [image] * 3}}, GREEDY)
    assert info.value.param == "multi_modal_data.image[2]"
    with pytest.raises(ValueError, match="1 <image> placeholders for 2 images"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [image, image]}}, GREEDY)
    with pytest.raises(MediaError, match="not an image") as info:
        llm.chat(image_chat("hi", "data:image/png;base64,aGVsbG8="), GREEDY)
    assert info.value.param == "messages.0.content.1.image_url"


def test_split_images_shows_the_template_its_content_format():
    from sluice.multimodal.processor import split_images

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                             {"type": "image_url", "image_url": {"url": "data:a"}},
                                             {"type": "image_url", "image_url": {"url": "data:b"}}]}]
    parts, images = split_images(messages, "openai", "<image>")
    assert parts[1]["content"] == [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]
    assert images == [("data:a", "messages.1.content.1.image_url"), ("data:b", "messages.1.content.2.image_url")]
    text, _ = split_images(messages, "string", "<image>")
    assert text[0] == messages[0] and text[1]["content"] == "Compare\n<image>\n<image>"


def test_tower_takes_the_faster_prompt_dtype(llava_dir, llm, monkeypatch):
    """--dtype auto on a CPU: the decoder runs in bfloat16 while the vision tower, which only runs
    whole images, takes the dtype prompt_dtype measures as faster (patched here to float32, what
    a CPU without AMX measures); the image features still reach the bfloat16 projector."""
    import torch

    import sluice.worker.model_runner as model_runner

    monkeypatch.setattr(model_runner, "prompt_dtype", lambda model_config, width, inner: torch.float32)
    auto = LLM(llava_dir, dtype="auto", block_size=4, kv_cache_memory_bytes=1 << 22)
    model = auto.engine_core.executor.worker.runner.model
    if auto.engine_core.executor.worker.runner.dtype != torch.bfloat16:
        pytest.skip("--dtype auto is not bfloat16 on this machine")
    assert next(model.tower().parameters()).dtype == torch.float32
    assert model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    pixels = torch.rand(1, 3, 32, 32)
    reference = llm.engine_core.executor.worker.runner.model.embed_images(pixels)  # all float32
    torch.testing.assert_close(model.embed_images(pixels).float(), reference, rtol=0.05, atol=0.05)
    [out] = auto.generate({"prompt": "Look: <image>", "multi_modal_data": {"image": make_image(7)}}, GREEDY,
                          use_tqdm=False)
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
