"""The routes around the chat API, driven by the real clients: the openai SDK's Responses API,
the anthropic SDK's Messages API, SageMaker's /ping and /invocations, /server_info, /load,
/reset_prefix_cache, sleep mode, CORS, --root-path, and a server on a Unix domain socket.

Two servers: one with an API key, a root path, CORS for one origin and sleep mode; one on a
Unix socket with the defaults (no CORS) and no docs or access log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import anthropic
import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME
from tests.server.utils import COMMON_FLAGS, STARTUP_TIMEOUT_S, RemoteServer

KEY = "endpoint-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
ROOT = "/llm"
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
NEW_ROUTES = [  # (method, path, body, status with the key)
    ("GET", "/ping", None, 200),
    ("POST", "/ping", None, 200),
    ("POST", "/invocations", CHAT, 200),
    ("GET", "/server_info", None, 200),
    ("GET", "/load", None, 200),
    ("POST", "/reset_prefix_cache", None, 200),
    ("GET", "/is_sleeping", None, 200),
    ("POST", "/wake_up", None, 200),
    ("POST", "/v1/responses", {"model": MODEL_NAME, "input": "Hi", "max_output_tokens": 2}, 200),
    ("POST", "/v1/messages", {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}, 200),
]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def srv():
    server = RemoteServer("--api-key", KEY, "--root-path", ROOT, "--allowed-origins", json.dumps([ORIGIN]),
                          "--enable-sleep-mode", "--tool-call-parser", "hermes", "--dtype", "float32",
                          "--enable-prompt-tokens-details")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def oai(srv) -> openai.OpenAI:
    return srv.client(api_key=KEY)


@pytest.fixture(scope="module")
def claude(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)


def chat_text(oai: openai.OpenAI, messages: list[dict], max_tokens: int, **extra) -> openai.types.chat.ChatCompletion:
    return oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, **extra)


# ---- auth, SageMaker, info routes -------------------------------------------------------------
def test_every_new_route_needs_the_key(srv):
    with srv.http() as http:
        for method, path, body, status in NEW_ROUTES:
            assert http.request(method, path, json=body).status_code == 401, path
            assert http.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            reply = http.request(method, path, json=body, headers=AUTH)
            assert reply.status_code == status, (path, reply.text)
        # Anthropic's clients send the key as x-api-key.
        assert http.get("/load", headers={"x-api-key": KEY}).status_code == 200
        assert http.get("/load", headers={"x-api-key": "wrong"}).status_code == 401


def test_invocations_route_by_body_shape(srv, oai):
    with srv.http(headers=AUTH) as http:
        chat = http.post("/invocations", json={**CHAT, "max_tokens": 6, **GREEDY}).json()
        completion = http.post("/invocations", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3}).json()
        neither = http.post("/invocations", json={"model": MODEL_NAME})
        bad_field = http.post("/invocations", json={**CHAT, "max_tokens": 0})
        not_json = http.post("/invocations", content=b"{", headers={"content-type": "application/json"})
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == chat_text(oai, CHAT["messages"], 6).choices[0].message.content
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 3
    assert neither.status_code == 400 and "messages" in neither.json()["error"]["message"]
    assert bad_field.status_code == 400 and bad_field.json()["error"]["param"] == "max_tokens"
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]


def test_server_info_and_load(srv):
    with srv.http(headers=AUTH) as http:
        info = http.get("/server_info").json()
        assert info["served_model_names"] == [MODEL_NAME]
        assert info["engine_config"]["model"]["max_model_len"] == 1024
        assert http.get("/load").json() == {"server_load": 0}
        body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            load = http.get("/load").json()
            assert load == {"server_load": 1}, (first, [next(lines) for _ in range(4)])  # the stream in flight
        deadline = time.monotonic() + 30
        while http.get("/load").json()["server_load"] and time.monotonic() < deadline:
            time.sleep(0.1)  # the abort of the closed stream lands
        assert http.get("/load").json() == {"server_load": 0}


def test_reset_prefix_cache_forgets_cached_prompts(srv):
    prompt = list(range(1000, 1200))  # three full 64-token blocks

    def cached() -> int:
        with srv.http(headers=AUTH) as http:
            body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1}
            return http.post("/v1/completions", json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached()
    assert cached() == 192
    with srv.http(headers=AUTH) as http:
        assert http.post("/reset_prefix_cache").json() == {"reset": True}
    assert cached() == 0


# ---- the Responses API --------------------------------------------------------------------------
def test_responses_create_matches_chat(oai):
    chat = chat_text(oai, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}], 8)
    response = oai.responses.create(model=MODEL_NAME, instructions="Be brief.", input="Name a color.",
                                    max_output_tokens=8, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    cut = oai.responses.create(model=MODEL_NAME, input="Tell me a long story.", max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    as_messages = oai.responses.create(model=MODEL_NAME, max_output_tokens=8, temperature=0, input=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]},
    ])
    assert as_messages.output_text == response.output_text


def test_responses_stream_sends_the_typed_events(oai):
    whole = oai.responses.create(model=MODEL_NAME, input="Say hello.", max_output_tokens=40, temperature=0)
    events = list(oai.responses.create(model=MODEL_NAME, input="Say hello.", max_output_tokens=40, temperature=0,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_responses_function_call_round_trip(oai):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = oai.responses.create(model=MODEL_NAME, input=[question], tools=tools, max_output_tokens=60,
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    streamed = list(oai.responses.create(model=MODEL_NAME, input=[question], tools=tools, max_output_tokens=60,
                                         tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                         stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    answer = oai.responses.create(model=MODEL_NAME, tools=tools, max_output_tokens=10, temperature=0, input=[
        question,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ], tool_choice="none")
    assert answer.output_text and not [item for item in answer.output if item.type == "function_call"]


@pytest.mark.parametrize("extra, param", [
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    # a text-only model: the chat path's refusal, under the Responses API's field name
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.image_url"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
])
def test_responses_refusals_name_the_field(oai, extra, param):
    body = {"model": MODEL_NAME, "input": "Hi", "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        oai.post("/responses", body=body, cast_to=dict)
    assert info.value.body["param"] == param, info.value.body


def test_responses_unknown_fields_are_accepted_as_on_chat(oai):
    body = {"model": MODEL_NAME, "input": "Hi", "max_output_tokens": 4, "unknown_field": 1}
    assert oai.post("/responses", body=body, cast_to=dict)["status"] in ("completed", "incomplete")


# ---- Anthropic's Messages API ---------------------------------------------------------------------
def test_messages_match_chat_streamed_and_not(oai, claude):
    chat = chat_text(oai, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}], 12)
    message = claude.messages.create(model=MODEL_NAME, max_tokens=12, system="Be brief.", extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "Name a fruit."}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].text == chat.choices[0].message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                        chat.usage.completion_tokens)
    with claude.messages.stream(model=MODEL_NAME, max_tokens=12, system=[{"type": "text", "text": "Be brief."}],
                                messages=[{"role": "user", "content": "Name a fruit."}], extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text == final.content[0].text
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens == message.usage.input_tokens


def test_messages_stop_sequences(oai, claude):
    whole = chat_text(oai, [{"role": "user", "content": "Count from 1 to 9."}], 40).choices[0].message.content
    stop = next(word for word in ("3", "4", "5", " ") if whole.find(word) > 0)
    message = claude.messages.create(model=MODEL_NAME, max_tokens=40, stop_sequences=[stop], extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "Count from 1 to 9."}])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == whole[: whole.index(stop)]


def test_messages_tool_use_round_trip(claude):
    tools = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = claude.messages.create(model=MODEL_NAME, max_tokens=60, tools=tools, messages=[question],
                                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert first.stop_reason == "tool_use" and use.name == "get_weather" and isinstance(use.input["city"], str)
    with claude.messages.stream(model=MODEL_NAME, max_tokens=60, tools=tools, messages=[question],
                                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use.input]
    answer = claude.messages.create(model=MODEL_NAME, max_tokens=10, tools=tools, extra_body=GREEDY,
                                    tool_choice={"type": "none"}, messages=[
        question,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]},
    ])
    assert answer.content[0].type == "text" and answer.content[0].text


def test_messages_bad_requests_name_the_field(srv, claude):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL_NAME, max_tokens=0, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["error"]["param"] == "max_tokens"
    with srv.http(headers=AUTH) as http:
        missing = http.post("/v1/messages", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]})
        image = http.post("/v1/messages", json={"model": MODEL_NAME, "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "AAAA"}}]}]})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "max_tokens"
    error = image.json()["error"]  # a text-only model
    assert image.status_code == 400 and error["param"] == "messages.0.content.0.source", error
    assert "text only" in error["message"]


# ---- CORS and the root path ----------------------------------------------------------------------
def preflight(http: httpx.Client, origin: str) -> httpx.Response:
    return http.options("/v1/chat/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})


def test_cors_allows_only_the_named_origin(srv):
    with srv.http() as http:
        allowed, denied = preflight(http, ORIGIN), preflight(http, "https://evil.example")
        simple = http.get("/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_root_path_serves_with_and_without_the_prefix(srv):
    with srv.http() as http:
        assert http.get(f"{ROOT}/health").status_code == 200  # still public under the prefix
        assert http.get(f"{ROOT}/v1/models").status_code == 401
        assert http.get(f"{ROOT}/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL_NAME
        assert http.get("/v1/models", headers=AUTH).status_code == 200
        schema = http.get("/openapi.json", headers=AUTH).json()
    assert "GET /v1/models" in srv.logs()  # the access log is on by default
    assert schema["servers"] == [{"url": ROOT}]
    assert "/v1/responses" in schema["paths"] and "/v1/messages" in schema["paths"]


# ---- sleep mode (last on this server: it drops the caches) ---------------------------------------
def test_sleep_frees_memory_and_wake_up_restores_the_same_outputs(srv):
    body = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    core = srv.core_process()
    with srv.http(headers=AUTH) as http:
        before_text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        rss_awake = core.memory_info().rss
        slept = http.post("/sleep", params={"level": 1}).json()
        rss_asleep = core.memory_info().rss
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 503 and "sleeping" in refused.json()["error"]["message"]
        assert http.post("/sleep", params={"level": 2}).status_code == 400
        woke = http.post("/wake_up").json()
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
        after_text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    print(f"core RSS awake {rss_awake / 2**20:.0f} MiB, asleep {rss_asleep / 2**20:.0f} MiB; "
          f"sleep {slept}, wake_up {woke}")
    # float32 weights of a 135M model are ~540 MB; most of them leave the process.
    assert rss_awake - rss_asleep > 300 << 20
    assert slept["rss_bytes_before"] - slept["rss_bytes_after"] > 300 << 20
    assert after_text == before_text


# ---- a Unix domain socket, default CORS, no docs, no access log ----------------------------------
@pytest.fixture(scope="module")
def uds_server():
    path = os.path.join(tempfile.mkdtemp(prefix="sluice-uds-"), "sluice.sock")
    log = tempfile.NamedTemporaryFile("w+", prefix="sluice-uds-", suffix=".log", delete=False)
    args = [sys.executable, "-m", "sluice.entrypoints.cli", "serve", *COMMON_FLAGS, "--uds", path,
            "--disable-fastapi-docs", "--disable-uvicorn-access-log"]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://sluice", timeout=120)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        assert process.poll() is None and time.monotonic() < deadline, open(log.name).read()
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.25)
    yield client, path, log.name
    client.close()
    process.terminate()
    assert process.wait(60) == 0
    assert not os.path.exists(path)  # the socket file goes with the server


def test_uds_serves_the_api(uds_server):
    client, path, log = uds_server
    reply = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    oai = openai.OpenAI(base_url="http://sluice/v1", api_key="none", max_retries=0,
                        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=path)))
    assert oai.models.list().data[0].id == MODEL_NAME
    assert "unix:" + path in open(log).read()


def test_defaults_no_cors_no_docs_no_access_log_no_sleep_routes(uds_server):
    client, _, log = uds_server
    reply = preflight(client, ORIGIN)
    assert "access-control-allow-origin" not in reply.headers
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": ORIGIN}).headers
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    assert client.post("/sleep").status_code == 404  # only with --enable-sleep-mode
    assert client.get("/ping").status_code == 200
    assert "GET /v1/models" not in open(log).read()  # no access log lines
