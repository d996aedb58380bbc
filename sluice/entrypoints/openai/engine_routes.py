"""Routes around the OpenAI API that vLLM servers have and operators script against:
SageMaker's `/ping` and `/invocations`, `/server_info`, `/load`, `/reset_prefix_cache`, and
(with `--enable-sleep-mode`) `/sleep`, `/wake_up`, `/is_sleeping`. Each is behind the API key
like every other route but the ones `--public-endpoints` names.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import Response

import sluice
from sluice.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api_error,
)

Respond = Callable[[Request, Awaitable], Awaitable[Response]]
TraceHeaders = Callable[[Request], dict[str, str] | None]


async def json_body(request: Request) -> dict:
    """The request body as a JSON object, or a 400 saying what it is instead."""
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise APIError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def parse(model: type[pydantic.BaseModel], body: dict) -> pydantic.BaseModel:
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise validation_error_to_api_error(exc) from exc


def add_engine_routes(app: FastAPI, state, respond: Respond, trace_headers: TraceHeaders,
                      enable_sleep_mode: bool) -> None:
    """`state` is the server's ServerState (engine, serving, health)."""
    engine, serving = state.engine, state.serving

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """SageMaker's health check: /health under another name."""
        return await state.health()

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """SageMaker's one inference route: the body's shape picks the API, as in vLLM."""
        body = await json_body(request)
        if "messages" in body:
            return await respond(request, serving.chat(parse(ChatCompletionRequest, body), trace_headers(request)))
        if "prompt" in body:
            return await respond(request, serving.completions(parse(CompletionRequest, body), trace_headers(request)))
        raise APIError("the body must have `messages` (chat completions) or `prompt` (completions)",
                       param="messages")

    @app.get("/server_info")
    async def server_info() -> dict:
        return {"version": sluice.__version__, "served_model_names": serving.served_model_names,
                "engine_config": engine.client.info.get("config")}

    @app.get("/load")
    async def load() -> dict:
        """vLLM's server load metric: generation requests this API process is serving now."""
        return {"server_load": engine.num_in_flight}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict:
        if not await engine.call_utility("reset_prefix_cache"):
            raise APIError("the prefix cache cannot be reset while requests hold KV blocks; retry when idle", 409)
        return {"reset": True}

    if not enable_sleep_mode:
        return

    @app.post("/sleep")
    async def sleep(level: int = 1) -> dict:
        """Level 1: weights to a disk-backed file, KV cache dropped; new requests get 503 until /wake_up."""
        return await utility("sleep", level)

    @app.post("/wake_up")
    async def wake_up() -> dict:
        return await utility("wake_up")

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict:
        return {"is_sleeping": await engine.call_utility("is_sleeping")}

    async def utility(method: str, *args) -> dict:
        try:
            return await engine.call_utility(method, *args)
        except ValueError as exc:  # the core refused: a bad level, or requests still running
            raise APIError(str(exc)) from exc
