"""Qwen2-VL behind `sluice serve`: an image as a data URL through the official openai client, greedy
parity with transformers, a repeated image served from the prefix cache (its M-RoPE positions
picked up mid-prompt), and the shared image checks answering a 400 that names the part."""

import openai
import pytest

from tests.multimodal.server_checks import MAX_TOKENS, chat, check_repeat_hits_prefix_cache
from tests.multimodal.tiny_llava import data_url, image_chat, make_image
from tests.server.utils import RemoteServer


@pytest.fixture(scope="module")
def srv(qwen2_vl_dir):
    server = RemoteServer(qwen2_vl_dir, "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
                          "--limit-mm-per-prompt", '{"image": 1}')
    yield server
    server.stop()


def test_data_url_chat_matches_transformers_and_hits_the_prefix_cache(srv, hf_qwen2_vl, hf_qwen2_vl_greedy):
    image = make_image(7, size=(64, 30))
    messages = image_chat("What is in this picture?", data_url(image))
    shown = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image"}]}]
    text = hf_qwen2_vl[2].apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
    expected = hf_qwen2_vl_greedy(text, [image], MAX_TOKENS, add_special_tokens=False)
    check_repeat_hits_prefix_cache(srv, messages, expected)


def test_too_many_images_is_a_400_naming_the_part(srv):
    with pytest.raises(openai.BadRequestError) as info:
        chat(srv.client(), image_chat("hi", data_url(make_image(9)), data_url(make_image(10))))
    error = info.value.body
    assert error["param"] == "messages.0.content.2.image_url" and "at most 1" in error["message"], error
