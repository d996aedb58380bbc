"""LLaVA behind `sluice serve`: an image as a data URL through the official openai client, greedy
parity with transformers, a repeated image served from the prefix cache, and a 400 naming the
part for each bad image input."""

import base64
import struct
import zlib

import openai
import pytest

from tests.multimodal.server_checks import MAX_TOKENS, chat, check_repeat_hits_prefix_cache
from tests.multimodal.tiny_llava import data_url, image_chat, make_image, template_text
from tests.server.utils import RemoteServer


@pytest.fixture(scope="module")
def srv(llava_dir):
    server = RemoteServer(llava_dir, "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
                          "--limit-mm-per-prompt", '{"image": 1}', "--allowed-media-domains", "localhost")
    yield server
    server.stop()


def test_data_url_chat_matches_transformers_and_hits_the_prefix_cache(srv, hf_llava, hf_greedy):
    image = make_image(7)
    messages = image_chat("What is in this picture?", data_url(image))
    expected = hf_greedy(template_text(hf_llava[1], messages), [image], MAX_TOKENS, add_special_tokens=False)
    check_repeat_hits_prefix_cache(srv, messages, expected)


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


# ---- the same images through the Responses and Anthropic Messages APIs, and /tokenize ----------
def b64_png(image) -> str:
    return data_url(image).removeprefix("data:image/png;base64,")


def anthropic_image(data: str, media_type: str = "image/png") -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def claude(srv):
    import anthropic

    return anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)


def test_responses_and_messages_apis_read_images_as_chat_does(srv):
    """Same image, same prompt: the Responses and Messages APIs answer what chat answers (whose
    token parity with transformers is checked above), and count the same prompt tokens."""
    client = srv.client()
    model = client.models.list().data[0].id
    image = make_image(11)
    expected = chat(client, image_chat("Describe it.", data_url(image)))
    response = client.responses.create(model=model, max_output_tokens=MAX_TOKENS, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Describe it."},
                                     {"type": "input_image", "image_url": data_url(image), "detail": "auto"}]}])
    assert response.output_text == expected.choices[0].message.content
    assert response.usage.input_tokens == expected.usage.prompt_tokens
    message = claude(srv).messages.create(model=model, max_tokens=MAX_TOKENS, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}, anthropic_image(b64_png(image))]}])
    assert message.content[0].text == expected.choices[0].message.content
    assert message.usage.input_tokens == expected.usage.prompt_tokens


def test_tokenize_counts_image_tokens(srv, hf_llava):
    """/tokenize with an image in the messages: the placeholders expanded, as the engine sees them."""
    messages = image_chat("Count me.", data_url(make_image(12)))
    expected = chat(srv.client(), messages)
    with srv.http() as http:
        body = http.post("/tokenize", json={"messages": messages}).json()
    assert body["count"] == expected.usage.prompt_tokens == len(body["tokens"])
    image_token_id = hf_llava[0].config.image_token_id
    assert body["tokens"].count(image_token_id) == 16  # (32 / 8) ** 2 patches


def test_image_errors_name_the_callers_own_fields(srv):
    """Each API's 400 names its own field for a bad image (the chat path's checks, renamed)."""
    client = srv.client()
    model = client.models.list().data[0].id
    two = [{"type": "input_image", "image_url": data_url(make_image(i))} for i in (13, 14)]
    junk = base64.b64encode(b"not a picture").decode()
    cases = [
        (lambda: client.responses.create(model=model, max_output_tokens=2, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}, *two]}]),
         "input.0.content.2.image_url", "at most 1"),
        (lambda: client.responses.create(model=model, max_output_tokens=2, input=[
            {"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]),
         "input.0.content.0.file_id", "not supported"),
    ]
    for call, param, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == param and words in info.value.body["message"], info.value.body
    import anthropic

    for block, param, words in [
        (anthropic_image(junk), "messages.2.content.1.source", "not an image"),
        (anthropic_image(junk, "image/bmp"), "messages.2.content.1.source.media_type", "image/bmp"),
        ({"type": "image", "source": {"type": "file", "file_id": "f"}}, "messages.2.content.1.source.type", "'file'"),
    ]:
        with pytest.raises(anthropic.BadRequestError) as info:
            claude(srv).messages.create(model=model, max_tokens=2, messages=[
                {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, block]}])
        error = info.value.body["error"]
        assert error["param"] == param and words in error["message"], error
