"""LLaVA behind `sluice serve`: an image as a data URL through the official openai client, greedy
parity with transformers, a repeated image served from the prefix cache, and a 400 naming the
part for each bad image input."""

import base64
import struct
import zlib

import openai
import pytest

from tests.multimodal.tiny_llava import data_url, image_chat, make_image, template_text
from tests.server.utils import RemoteServer

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def srv(llava_dir):
    server = RemoteServer(llava_dir, "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
                          "--limit-mm-per-prompt", '{"image": 1}', "--allowed-media-domains", "localhost")
    yield server
    server.stop()


def chat(client, messages):
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                          max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})


def test_data_url_chat_matches_transformers_and_hits_the_prefix_cache(srv, hf_llava, hf_greedy):
    client = srv.client()
    image = make_image(7)
    messages = image_chat("What is in this picture?", data_url(image))
    expected = hf_greedy(template_text(hf_llava[1], messages), [image], MAX_TOKENS, add_special_tokens=False)
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


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data): refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("urls, param, words", [
    ([data_url(make_image(9)), data_url(make_image(10))], "messages.0.content.2.image_url", "at most 1"),
    (["data:image/png;base64," + base64.b64encode(b"not a picture").decode()], "messages.0.content.1.image_url",
     "not an image"),
    (["data:text/plain;base64,aGVsbG8="], "messages.0.content.1.image_url", "not an image"),
    (["data:image/png;base64," + base64.b64encode(png_header(5000, 5000)).decode()],
     "messages.0.content.1.image_url", "5000x5000 pixels"),
    (["https://images.example.org/cat.png"], "messages.0.content.1.image_url", "not in --allowed-media-domains"),
    (["http://localhost:9/cat.png"], "messages.0.content.1.image_url", "loopback"),
    (["ftp://localhost/cat.png"], "messages.0.content.1.image_url", "unsupported URL scheme"),
])
def test_bad_images_are_400s_naming_the_part(srv, urls, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        chat(srv.client(), image_chat("hi", *urls))
    error = info.value.body
    assert error["param"] == param and words in error["message"], error
