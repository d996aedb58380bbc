"""Qwen2-VL behind `sluice serve`: an image as a data URL through the official openai client, greedy
parity with transformers, a repeated image served from the prefix cache (its M-RoPE positions
picked up mid-prompt), and the shared image checks answering a 400 that names the part."""

import openai
import pytest

from tests.multimodal.tiny_llava import data_url, image_chat, make_image
from tests.server.utils import RemoteServer

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def srv(qwen2_vl_dir):
    server = RemoteServer(qwen2_vl_dir, "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
                          "--limit-mm-per-prompt", '{"image": 1}')
    yield server
    server.stop()


def chat(client, messages):
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                          max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})


def test_data_url_chat_matches_transformers_and_hits_the_prefix_cache(srv, hf_qwen2_vl, hf_qwen2_vl_greedy):
    client = srv.client()
    image = make_image(7, size=(64, 30))
    messages = image_chat("What is in this picture?", data_url(image))
    shown = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image"}]}]
    text = hf_qwen2_vl[2].apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
    expected = hf_qwen2_vl_greedy(text, [image], MAX_TOKENS, add_special_tokens=False)
    before = srv.metrics()
    first = chat(client, messages)
    assert first.choices[0].token_ids == expected
    second = chat(client, messages)
    after = srv.metrics()
    assert second.choices[0].token_ids == expected

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    # the second request reused every full block but the last token's, the image's placeholders included
    assert delta("vllm:prefix_cache_hits_total") == (first.usage.prompt_tokens - 1) // 4 * 4
    assert delta("vllm:mm_cache_queries_total") == 1 and delta("vllm:mm_cache_hits_total") == 0


def test_too_many_images_is_a_400_naming_the_part(srv):
    with pytest.raises(openai.BadRequestError) as info:
        chat(srv.client(), image_chat("hi", data_url(make_image(9)), data_url(make_image(10))))
    error = info.value.body
    assert error["param"] == "messages.0.content.2.image_url" and "at most 1" in error["message"], error
