"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

Works with any server that speaks `/v1/completions` or `/v1/chat/completions` with SSE
(sluice, vLLM, llama.cpp's server). A failure of any kind (HTTP status, an SSE error event,
a dropped connection, a timeout) ends up in the record's `error`, never as an exception, so one
bad request never stops a benchmark.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import httpx

from sluice.bench.datasets import BenchRequest

EndpointType = Literal["completions", "chat"]
ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
BACKENDS: dict[str, EndpointType] = {"openai": "completions", "vllm": "completions", "openai-chat": "chat"}


def request_headers(api_key: str | None, extra: dict[str, str]) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {**auth, **extra}


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: the full URL, the API flavour, and the body fields every request shares."""

    url: str
    kind: EndpointType
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    sampling: dict = field(default_factory=dict)  # temperature, top_p, top_k: sent only when set
    extra_headers: dict = field(default_factory=dict)  # --header
    extra_body: dict = field(default_factory=dict)  # --extra-body: merged into every body last

    def headers(self) -> dict[str, str]:
        return request_headers(self.api_key, self.extra_headers)

    def body(self, prompt: str, max_tokens: int) -> dict:
        body: dict = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}, **self.sampling}
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension; sluice and vLLM honour it
        return {**body, **self.extra_body}


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times in seconds; `start_s` from the benchmark's start, the
    others from the moment this request was sent."""

    index: int
    prompt_len: int
    expected_output_len: int
    start_s: float = 0.0
    ttft_s: float | None = None  # first chunk with content
    e2el_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # every content chunk's arrival
    text: str = ""
    output_tokens: int = 0  # the headline count: the server's usage, else the re-tokenized count
    output_tokens_retokenized: int = 0  # `text` re-tokenized with the benchmark's tokenizer
    usage_prompt_tokens: int | None = None  # what the server's usage said, when it sent one
    usage_output_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    success: bool = False
    error: str = ""
    prefix_index: int | None = None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between successive content chunks."""
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:])]

    def to_json(self) -> dict:
        return {**asdict(self), "itl_s": self.itl_s}


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, request: BenchRequest,
                       index: int, origin: float) -> RequestRecord:
    """Send one request, read its stream to the end, and say what happened."""
    record = RequestRecord(index, request.prompt_len, request.output_len, prefix_index=request.prefix_index)
    sent = time.perf_counter()
    record.start_s = sent - origin
    texts: list[str] = []
    try:
        async with client.stream("POST", endpoint.url, json=endpoint.body(request.prompt, request.output_len),
                                 headers=endpoint.headers()) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
            else:
                done = await _read_events(response, endpoint.kind, record, texts, sent)
                if not (record.error or done or record.finish_reason):
                    record.error = "stream ended before a finish_reason or [DONE]"
    except (httpx.HTTPError, httpx.StreamError, OSError) as e:
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    record.e2el_s = time.perf_counter() - sent
    record.text = "".join(texts)
    record.success = not record.error
    return record


async def _read_events(response: httpx.Response, kind: EndpointType, record: RequestRecord,
                       texts: list[str], sent: float) -> bool:
    """Consume SSE lines into the record; True once [DONE] arrived."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return True
        now = time.perf_counter() - sent
        try:
            event = json.loads(data)
        except ValueError:
            record.error = f"bad SSE data: {data[:200]}"
            return False
        if "error" in event:
            record.error = f"error event: {_error_text(event['error'])}"
            return False
        _take_usage(event.get("usage"), record)
        for choice in event.get("choices") or []:
            text = _chunk_text(choice, kind)
            if text:
                if record.ttft_s is None:
                    record.ttft_s = now
                record.chunk_times_s.append(now)
                texts.append(text)
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
    return False


def _chunk_text(choice: dict, kind: EndpointType) -> str:
    if kind == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking separately; it is generated output all the same.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


def _take_usage(usage: dict | None, record: RequestRecord) -> None:
    if not usage:
        return
    record.usage_prompt_tokens = usage.get("prompt_tokens")
    record.usage_output_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = details.get("cached_tokens")


def _error_text(error) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_message(body: bytes) -> str:
    """The message inside an OpenAI-style error body, else the body's start."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(parsed, dict) and (parsed.get("error") or parsed.get("message")):
        return _error_text(parsed.get("error") or parsed)
    return text[:500]


class ServerTokenizer:
    """The server's own /tokenize and /detokenize, with the few tokenizer methods the benchmark
    uses: for a --model that is a served name no tokenizer loads from. The vocabulary size is
    found by bisecting on which ids /detokenize accepts; special ids are unknown (none)."""

    MAX_VOCAB = 1 << 22

    def __init__(self, root: str, headers: dict[str, str], model: str) -> None:
        self.http = httpx.Client(base_url=root, headers=headers, timeout=120)
        self.model = model
        self.all_special_ids: list[int] = []
        self.vocab_size = self._bisect_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        return self._post("/tokenize", body)["tokens"]

    def decode(self, token_ids: list[int]) -> str:
        return self._post("/detokenize", {"model": self.model, "tokens": list(token_ids)})["prompt"]

    def __len__(self) -> int:
        return self.vocab_size

    def _post(self, path: str, body: dict) -> dict:
        response = self.http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def _bisect_vocab_size(self) -> int:
        low, high = 1, self.MAX_VOCAB  # id low - 1 decodes; id high does not
        self.decode([0])
        while low < high:
            middle = (low + high) // 2
            if self.http.post("/detokenize", json={"model": self.model, "tokens": [middle]}).status_code == 200:
                low = middle + 1
            else:
                high = middle
        return low
