"""Pooling endpoints (vLLM's shapes): /v1/embeddings (OpenAI's), /pooling, /classify, /score and
/v1/score, /rerank, /v1/rerank and /v2/rerank (Jina / Cohere). A model serves these or
generation, never both: the other kind gets a 400 naming the runner it has.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from sluice.engine.input_processor import truncate_prompt
from sluice.entrypoints.openai.protocol import APIError, OpenAIModel, Prompt, _is_token_ids
from sluice.pooling.config import check_pooling_params
from sluice.pooling.inputs import pair_token_ids
from sluice.pooling.outputs import class_probs
from sluice.pooling.params import PoolingParams


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    normalize: bool | None = None  # vLLM's extra: None follows the model's pooler config

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.input, str) or _is_token_ids(self.input):
            return [self.input]
        return list(self.input)


class ClassificationRequest(OpenAIModel):
    model: str | None = None
    input: Prompt
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)

    prompts = EmbeddingRequest.prompts


class ScoreRequest(OpenAIModel):
    """text_1: one query (scored against every text_2) or as many as text_2 (pairwise)."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class RerankRequest(OpenAIModel):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(default=None, ge=0)  # None or 0: all of them
    return_documents: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class PoolingServing:
    def __init__(self, serving) -> None:
        self.serving = serving  # check_model and tokenization live there
        self.engine = serving.engine

    async def _tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        return await self.serving._off_loop(
            lambda: [self.serving._tokenize_prompt(prompt, None)[1] for prompt in prompts])

    async def _pool(self, token_ids: list[list[int]], params: PoolingParams, truncate: int | None,
                    field: str) -> tuple[list[list[float]], list[list[int]]]:
        """The vectors, and the token ids they were pooled from (after truncate_prompt_tokens)."""
        try:
            token_ids = [truncate_prompt(ids, truncate, self.engine.max_model_len) for ids in token_ids]
        except ValueError as exc:
            raise APIError(str(exc), 400, param="truncate_prompt_tokens") from None
        request_ids = [f"pool-{uuid.uuid4().hex}" for _ in token_ids]
        try:
            return await self.engine.encode(request_ids, token_ids, params, field), token_ids
        except ValueError as exc:
            raise APIError(str(exc), 400, param=field) from None

    @staticmethod
    def _usage(token_ids: list[list[int]]) -> dict:
        total = sum(map(len, token_ids))
        return {"prompt_tokens": total, "total_tokens": total}

    def _head(self, model: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model}

    async def embeddings(self, body: EmbeddingRequest, task: str = "embed", kind: str = "embedding") -> dict:
        model = self.serving.check_model(body.model)
        token_ids = await self._tokenize(body.prompts())
        params = PoolingParams(task=task, dimensions=body.dimensions, normalize=body.normalize)
        try:
            check_pooling_params(params, self.engine.pooler)
        except ValueError as exc:
            raise APIError(str(exc), 400, param="dimensions") from None
        vectors, token_ids = await self._pool(token_ids, params, body.truncate_prompt_tokens, "input")
        field = "embedding" if kind == "embedding" else "data"
        data = [{"index": i, "object": kind, field: self._encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {**self._head(model, "embd" if kind == "embedding" else "pool"), "data": data,
                "usage": self._usage(token_ids)}

    @staticmethod
    def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
        """float: a JSON list; base64: the float32 bytes, little-endian (what OpenAI's client decodes)."""
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        return vector

    async def classify(self, body: ClassificationRequest) -> dict:
        model = self.serving.check_model(body.model)
        token_ids = await self._tokenize(body.prompts())
        logits, token_ids = await self._pool(token_ids, PoolingParams(task="classify"), body.truncate_prompt_tokens,
                                             "input")
        data = []
        for i, row in enumerate(logits):
            probs = class_probs(row)
            best = int(np.argmax(probs))
            label = self.engine.id2label.get(str(best), self.engine.id2label.get(best, str(best)))
            data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
        return {**self._head(model, "classify"), "data": data, "usage": self._usage(token_ids)}

    async def _scores(self, queries: list[str], documents: list[str], truncate: int | None,
                      field: str) -> tuple[list[float], list[list[int]]]:
        """The cross-encoder's relevance of each (query, document) pair: sigmoid of its first logit."""
        try:
            token_ids = await self.serving._off_loop(
                lambda: [pair_token_ids(self.engine.input_processor, q, d) for q, d in zip(queries, documents)])
        except ValueError as exc:
            raise APIError(str(exc), 400, param=field) from None
        logits, token_ids = await self._pool(token_ids, PoolingParams(task="classify"), truncate, field)
        return [class_probs(row[:1])[0] for row in logits], token_ids

    async def score(self, body: ScoreRequest) -> dict:
        model = self.serving.check_model(body.model)
        queries = [body.text_1] if isinstance(body.text_1, str) else body.text_1
        documents = [body.text_2] if isinstance(body.text_2, str) else body.text_2
        if not queries or not documents:
            raise APIError("text_1 and text_2 must not be empty", 400, param="text_1" if not queries else "text_2")
        if len(queries) == 1:
            queries = queries * len(documents)
        if len(queries) != len(documents):
            raise APIError(f"text_1 has {len(queries)} texts and text_2 {len(documents)}: give one text_1 or "
                           "as many as text_2", 400, param="text_1")
        scores, token_ids = await self._scores(queries, documents, body.truncate_prompt_tokens, "text_2")
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return {**self._head(model, "score"), "data": data, "usage": self._usage(token_ids)}

    async def rerank(self, body: RerankRequest) -> dict:
        model = self.serving.check_model(body.model)
        if not body.documents:
            raise APIError("documents must not be empty", 400, param="documents")
        scores, token_ids = await self._scores([body.query] * len(body.documents), body.documents,
                                               body.truncate_prompt_tokens, "documents")
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": body.documents[i]}} if body.return_documents else {})}
                   for i in order[: body.top_n or None]]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
                "usage": {"total_tokens": sum(map(len, token_ids))}}


def add_pooling_routes(app: FastAPI, serving, respond) -> None:
    pooling = PoolingServing(serving)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await respond(request, pooling.embeddings(body))

    @app.post("/pooling")
    async def pool(body: EmbeddingRequest, request: Request) -> Response:
        return await respond(request, pooling.embeddings(body, task="encode", kind="pooling"))

    @app.post("/classify")
    async def classify(body: ClassificationRequest, request: Request) -> Response:
        return await respond(request, pooling.classify(body))

    for path in ("/score", "/v1/score"):
        @app.post(path)
        async def score(body: ScoreRequest, request: Request) -> Response:
            return await respond(request, pooling.score(body))

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        @app.post(path)
        async def rerank(body: RerankRequest, request: Request) -> Response:
            return await respond(request, pooling.rerank(body))
