"""Request fields of OpenAI's and vLLM's schemas against a real server: each one that changes the
output, held to what the offline engine (or vLLM's documented behaviour) gives, and its bad values
refused with a 400 naming it. One server for the module, started with this area's flags."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from sluice import LLM, SamplingParams
from tests.server.conftest import MODEL_NAME
from tests.server.utils import RemoteServer

HERE = os.path.dirname(__file__)
TOOL_TEMPLATE = os.path.join(HERE, "..", "structured", "tool_template.jinja")
PROMPT = "The capital of France is"
COUNT = "Count: 1, 2, 3, 4, 5,"
THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
                  "<think>\n\n</think>\n\n{% endif %}")
PARTS_TEMPLATE = ("{% for m in messages %}[{{ m.role }}]{% for part in m.content %}<{{ part.text }}>{% endfor %}"
                  "{% endfor %}")


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer("--dtype", "float32", "--chat-template", TOOL_TEMPLATE, "--tool-call-parser", "hermes",
                       "--reasoning-parser", "qwen3", "--enable-request-id-headers", "--enable-prompt-tokens-details",
                       "--enable-force-include-usage", "--default-chat-template-kwargs", '{"enable_thinking": true}')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    return server.http()


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20, dtype="float32")


def complete(http: httpx.Client, **body) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def refused(http: httpx.Client, path: str, body: dict, param: str) -> str:
    """A 400 in OpenAI's shape naming param; returns its message."""
    response = http.post(path, json={"model": MODEL_NAME, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


def chat_body(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 8, "temperature": 0, **fields}


def offline_text(offline: LLM, prompt, **params) -> str:
    return offline.generate([prompt], SamplingParams(temperature=0, **params), use_tqdm=False)[0].outputs[0].text


# ---- unknown and caller-only fields ---------------------------------------------------------------
def test_unknown_fields_are_accepted_and_logged_once(server, http):
    for _ in range(2):
        complete(http, prompt=PROMPT, max_tokens=2, frobnicate_level=3, user="u", safety_identifier="s",
                 prompt_cache_key="k", metadata={"a": "b"}, store=False, service_tier="auto")
    assert server.logs().count("'frobnicate_level' is unknown") == 1


# ---- the stop token's text ----------------------------------------------------------------------
def test_stop_token_text_is_left_out_as_in_vllm(client, http, offline):
    comma = http.post("/tokenize", json={"prompt": ","}).json()["tokens"][-1]
    plain = complete(http, prompt=COUNT, max_tokens=8, stop_token_ids=[comma])["choices"][0]
    kept = complete(http, prompt=COUNT, max_tokens=8, stop_token_ids=[comma], include_stop_str_in_output=True)
    assert plain["text"] == " 6" and plain["stop_reason"] == comma and kept["choices"][0]["text"] == " 6,"
    streamed = client.completions.create(model=MODEL_NAME, prompt=COUNT, max_tokens=8, temperature=0, stream=True,
                                         extra_body={"stop_token_ids": [comma]})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == " 6"
    chat_prompt = offline.get_tokenizer().apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                                              tokenize=False, add_generation_prompt=True)
    eos = complete(http, prompt=chat_prompt, max_tokens=60, skip_special_tokens=False)["choices"][0]
    assert eos["finish_reason"] == "stop" and eos["text"].strip() and "<|im_end|>" not in eos["text"]


# ---- token controls -------------------------------------------------------------------------------
def test_logit_bias_changes_the_output_as_offline(http, offline):
    token = http.post("/tokenize", json={"prompt": " banana"}).json()["tokens"][-1]
    text = complete(http, prompt=PROMPT, max_tokens=4, logit_bias={str(token): 100})["choices"][0]["text"]
    assert text == offline_text(offline, PROMPT, max_tokens=4, logit_bias={token: 100.0})
    assert text.startswith(" banana") and text != complete(http, prompt=PROMPT, max_tokens=4)["choices"][0]["text"]


def test_logit_bias_bad_values(http):
    refused(http, "/v1/completions", {"prompt": PROMPT, "logit_bias": {"dog": 1}}, "logit_bias")
    refused(http, "/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias")
    assert "[0, " in refused(http, "/v1/chat/completions", chat_body(logit_bias={"99999999": 1}), "logit_bias")


def test_bad_words_are_never_generated(http, offline):
    assert "Paris" in complete(http, prompt=PROMPT, max_tokens=6)["choices"][0]["text"]
    text = complete(http, prompt=PROMPT, max_tokens=6, bad_words=["Paris"])["choices"][0]["text"]
    assert "Paris" not in text and text == offline_text(offline, PROMPT, max_tokens=6, bad_words=["Paris"])
    refused(http, "/v1/completions", {"prompt": PROMPT, "bad_words": ["ok", ""]}, "bad_words")


def test_allowed_token_ids(http):
    allowed = http.post("/tokenize", json={"prompt": " yes no"}).json()["tokens"]
    out = complete(http, prompt=PROMPT, max_tokens=5, allowed_token_ids=allowed, logprobs=0)["choices"][0]
    assert out["text"].replace(" yes", "").replace(" no", "") == ""
    refused(http, "/v1/completions", {"prompt": PROMPT, "allowed_token_ids": []}, "allowed_token_ids")
    refused(http, "/v1/completions", {"prompt": PROMPT, "allowed_token_ids": [10 ** 7]}, "allowed_token_ids")


def test_truncate_prompt_tokens_keeps_the_last_tokens(http, offline):
    ids = http.post("/tokenize", json={"prompt": "Ignore this part. " + PROMPT}).json()["tokens"]
    reply = complete(http, prompt="Ignore this part. " + PROMPT, max_tokens=5, truncate_prompt_tokens=5)
    assert reply["usage"]["prompt_tokens"] == 5
    assert reply["choices"][0]["text"] == offline_text(offline, ids[-5:], max_tokens=5)
    refused(http, "/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 5000}, "truncate_prompt_tokens")
    refused(http, "/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens")


# ---- prompt logprobs and scoring ------------------------------------------------------------------
def offline_prompt_logprobs(offline: LLM, prompt_ids: list[int]) -> list[float | None]:
    out = offline.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
    return [None if e is None else e[t].logprob for t, e in zip(prompt_ids, out.prompt_logprobs)]


def test_prompt_logprobs_match_offline(http, offline):
    choice = complete(http, prompt=PROMPT, max_tokens=1, prompt_logprobs=2)["choices"][0]
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    expected = offline_prompt_logprobs(offline, ids)
    for token, entry, value in zip(ids[1:], entries[1:], expected[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-4) and len(entry) >= 2
    chat = http.post("/v1/chat/completions", json={"model": MODEL_NAME, **chat_body(prompt_logprobs=1)}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    refused(http, "/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs")


def test_echo_with_max_tokens_zero_scores_the_prompt(client, http, offline):
    reply = complete(http, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = reply["choices"][0]
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert choice["text"] == PROMPT and reply["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(offline_prompt_logprobs(offline, ids), abs=1e-4)
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                         stream=True)
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs) == len(ids)
    refused(http, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens")


# ---- chat templating -----------------------------------------------------------------------------
def test_continue_final_message_continues_it(client, http, offline):
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "My favourite fruit is"}]
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    ids = http.post("/tokenize", json={"model": MODEL_NAME, **body}).json()["tokens"]
    assert not http.post("/detokenize", json={"tokens": ids}).json()["prompt"].endswith("<|im_end|>\n")
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                       "echo": True})
    continuation = offline_text(offline, ids, max_tokens=6)
    assert reply.choices[0].message.content == "My favourite fruit is" + continuation
    assert reply.choices[0].message.role == "assistant"
    refused(http, "/v1/chat/completions", {"messages": messages, "continue_final_message": True}, None)
    refused(http, "/v1/chat/completions", {"messages": messages[:1], "continue_final_message": True,
                                           "add_generation_prompt": False}, None)


def test_chat_template_kwargs_reach_the_template(http):
    def prompt(**fields) -> str:
        ids = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}],
                                           "chat_template": THINK_TEMPLATE, **fields}).json()["tokens"]
        return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]

    assert "<think>" not in prompt()  # --default-chat-template-kwargs says enable_thinking: true
    assert prompt(chat_template_kwargs={"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    refused(http, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}],
                                "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs")


def test_content_parts_reach_the_template_in_its_format(http):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]

    def prompt(**fields) -> str:
        ids = http.post("/tokenize", json={"messages": [{"role": "user", "content": parts}], **fields}).json()["tokens"]
        return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]

    assert "a\nb" in prompt()  # the server's template takes a string
    assert prompt(chat_template=PARTS_TEMPLATE) == "[user]<a><b>"  # this one loops over parts
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    refused(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": image}]},
            "messages.0.content.0.image_url")  # a text-only model


# ---- tokens as ids, request ids, cache salt, suffix -------------------------------------------------
def test_return_tokens_as_token_ids(client, http):
    choice = complete(http, prompt=PROMPT, max_tokens=3, logprobs=1, return_tokens_as_token_ids=True)["choices"][0]
    ids = http.post("/tokenize", json={"prompt": PROMPT + choice["text"]}).json()["tokens"][-3:]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    assert all(item.token.startswith("token_id:") for item in chat.choices[0].logprobs.content)
    refused(http, "/v1/completions", {"prompt": PROMPT, "return_tokens_as_token_ids": [1]}, "return_tokens_as_token_ids")


def test_request_ids_in_the_body_and_headers(http):
    reply = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1,
                                               "request_id": "my-job-1"})
    assert reply.json()["id"] == "cmpl-my-job-1" and reply.headers["X-Request-Id"] == "my-job-1"
    reply = http.post("/v1/chat/completions", json={"model": MODEL_NAME, **chat_body(max_tokens=1)},
                      headers={"X-Request-Id": "trace-42"})
    assert reply.json()["id"] == "chatcmpl-trace-42" and reply.headers["X-Request-Id"] == "trace-42"
    generated = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1})
    assert generated.json()["id"] == "cmpl-" + generated.headers["X-Request-Id"]
    refused(http, "/v1/completions", {"prompt": PROMPT, "request_id": ""}, "request_id")


def test_cache_salt_separates_prefix_caches(http):
    prompt = "A salted prompt that fills several KV blocks: " + "one two three four five six seven " * 24

    def cached(**fields) -> int:
        return complete(http, prompt=prompt, max_tokens=1, **fields)["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(cache_salt="tenant-a")
    assert cached(cache_salt="tenant-a") > 0
    assert cached(cache_salt="tenant-b") == 0 and cached() == 0
    refused(http, "/v1/completions", {"prompt": PROMPT, "cache_salt": ""}, "cache_salt")


def test_suffix_needs_fim_tokens(http):
    assert "fill-in-the-middle" in refused(http, "/v1/completions", {"prompt": "def f(", "suffix": "):"}, "suffix")


def test_usage_is_forced_into_streams(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, stream=True))
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


# ---- reasoning -------------------------------------------------------------------------------------
THINKING = r"<think>[a-z ]{4,30}</think>[A-Z][a-z]{2,12}\."


def test_reasoning_is_split_from_the_content(client):
    """A regex makes the default model think aloud in tags; the qwen3 parser splits the reply."""
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=40,
                  temperature=0.8, seed=3, extra_body={"structured_outputs": {"regex": THINKING}})
    whole = client.chat.completions.create(**kwargs).choices[0].message
    reasoning, content = whole.model_extra["reasoning_content"], whole.content
    assert reasoning and content and "<think>" not in reasoning + content and content.endswith(".")
    thought = text = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
            text += delta.content or ""
    assert (thought, text) == (reasoning, content)
    hidden = client.chat.completions.create(**{**kwargs, "extra_body": {**kwargs["extra_body"],
                                                                        "include_reasoning": False}})
    assert hidden.choices[0].message.content == content and "reasoning_content" not in hidden.choices[0].message.model_extra


# ---- the tool loop ---------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"]}}}


def test_tool_round_trip_with_the_openai_sdk(client):
    """call -> the SDK's own assistant message (content None) and a tool message -> final answer."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER], tool_choice="required",
                                           max_tokens=40, temperature=0)
    call_message = first.choices[0].message
    assert call_message.content is None and call_message.tool_calls
    messages.append(call_message.model_dump(exclude_none=False))  # content: None, as the SDK sends it back
    messages.append({"role": "tool", "tool_call_id": call_message.tool_calls[0].id, "content": "22 C and sunny"})
    final = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER], max_tokens=20,
                                           temperature=0)
    assert final.choices[0].message.content
    without_content = [messages[0], {k: v for k, v in messages[1].items() if k != "content"}, messages[2]]
    again = client.chat.completions.create(model=MODEL_NAME, messages=without_content, tools=[WEATHER], max_tokens=20,
                                           temperature=0)
    assert again.choices[0].message.content == final.choices[0].message.content


def test_tool_round_trip_with_langchain(server):
    @tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"22 C and sunny in {city}"

    llm = ChatOpenAI(model=MODEL_NAME, base_url=server.url + "/v1", api_key="none", temperature=0,
                                      max_tokens=40, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    [call] = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert isinstance(final.content, str) and final.content and not final.tool_calls


# ---- strict mode and the response role: a second server ---------------------------------------------
def test_strict_request_fields_response_role_and_no_dashboard():
    strict = RemoteServer("--strict-request-fields", "--response-role", "narrator", "--disable-dashboard")
    try:
        http = strict.http()
        assert http.get("/dashboard").status_code == 404
        assert http.get("/dashboard/events").status_code == 404
        message = refused(http, "/v1/completions", {"prompt": PROMPT, "temprature": 0}, "temprature")
        assert message == "temprature: unknown field"
        reply = http.post("/v1/chat/completions", json={"model": MODEL_NAME, **chat_body(max_tokens=2)}).json()
        assert reply["choices"][0]["message"]["role"] == "narrator"
    finally:
        strict.stop()


def test_return_token_ids(client, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    choice = complete(http, prompt=PROMPT, max_tokens=4, return_token_ids=True)["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 4
    streamed = [c.choices[0] for c in client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                                                                 temperature=0, stream=True,
                                                                 extra_body={"return_token_ids": True}) if c.choices]
    assert [t for c in streamed for t in c.model_extra["token_ids"]] == choice["token_ids"]
    chat = http.post("/v1/chat/completions", json={"model": MODEL_NAME, **chat_body(return_token_ids=True)}).json()
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]
    assert len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]
    refused(http, "/v1/completions", {"prompt": PROMPT, "return_token_ids": [1]}, "return_token_ids")
