"""The API process's engine: tokenize and validate here, run in the core process, detokenize here.

Each user request gets an asyncio queue; the core client's receive loop feeds every queue
from the core's outputs through one OutputProcessor. Cancelling a request's iteration (the
HTTP client went away) aborts it in the core at once, so its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from sluice.core.kv_cache_manager import KVCacheSpec
from sluice.engine.core_client import EngineCoreClient, EngineDeadError
from sluice.engine.dp_client import DPEngineCoreClient
from sluice.engine.input_processor import InputProcessor
from sluice.engine.messages import EngineCoreOutput, QueueFullError
from sluice.engine.output_processor import OutputProcessor
from sluice.config import EngineConfig
from sluice.loader import generation_defaults, get_tokenizer, load_eos_token_ids, load_hf_config, model_source
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.multimodal.processor import MultiModalProcessor, multimodal_processor
from sluice.outputs import RequestOutput
from sluice.pooling.config import PoolerConfig, check_pooling_params, require_runner
from sluice.pooling.inputs import make_pooling_request
from sluice.pooling.params import PoolingParams
from sluice.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError"]

logger = logging.getLogger("sluice")


class AsyncLLM:
    def __init__(self, client: EngineCoreClient | DPEngineCoreClient, config: EngineConfig, tokenizer, eos_token_ids: tuple[int, ...],
                 default_sampling_params: dict, mm_processor: MultiModalProcessor | None = None) -> None:
        info = client.info
        self.client = client
        self.tokenizer = tokenizer
        self.max_model_len: int = info["max_model_len"]
        self.quantization: str = info["quantization"]  # the weights' method in use, for /v1/models
        self.input_processor = InputProcessor(tokenizer, self.max_model_len, info["vocab_size"], eos_token_ids,
                                              info["scheduling_policy"],
                                              KVCacheSpec(info["num_blocks"], info["block_size"],
                                                          tuple(info["kv_group_windows"])),
                                              max_logprobs=config.model.max_logprobs, mm_processor=mm_processor)
        self.default_sampling_params = default_sampling_params  # the model's generation-config defaults
        self.output_processor = OutputProcessor(tokenizer)
        self.queues: dict[str, asyncio.Queue] = {}  # user request id -> its outputs
        self.pooler = PoolerConfig(**info["pooler"]) if info.get("pooler") else None  # None: a generating model
        self.id2label: dict = info.get("id2label") or {}
        self.pooled: dict[str, asyncio.Future] = {}  # pooling request id -> its vector
        self.children: dict[str, list[str]] = {}  # user request id -> its core request ids
        client.on_outputs = self._on_outputs
        client.on_dead = self._on_dead

    @classmethod
    async def connect(cls, config: EngineConfig, cores: list[tuple[str, int]], timeout: float = 600.0) -> "AsyncLLM":
        """Attach to running core processes, (address, pid) each; waits until their model is loaded.
        Several cores are data-parallel replicas behind one client."""
        source = await asyncio.to_thread(model_source, config)
        tokenizer = await asyncio.to_thread(get_tokenizer, config)
        hf_config = await asyncio.to_thread(load_hf_config, source, config.model.hf_overrides)
        mm_processor = await asyncio.to_thread(multimodal_processor, config, source, hf_config, tokenizer)
        client = EngineCoreClient(*cores[0]) if len(cores) == 1 else DPEngineCoreClient(cores)
        await client.start(timeout)
        return cls(client, config, tokenizer, load_eos_token_ids(source), generation_defaults(source, config.model),
                   mm_processor)

    @property
    def alive(self) -> bool:
        return self.client.alive

    @property
    def num_in_flight(self) -> int:
        return len(self.queues)

    async def generate(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, *, priority: int = 0, stream: bool = False,
                       trace_headers: dict[str, str] | None = None,
                       cache_salt: str | None = None,
                       lora_request: LoRARequest | None = None,
                       mm_features: list[MultiModalFeature] | None = None) -> AsyncIterator[RequestOutput]:
        """Yields delta outputs as they come (stream) or one final output. Raises ValueError for
        bad input and QueueFullError / EngineDeadError before the first output."""
        if not self.client.alive:
            raise EngineDeadError(self.client.dead_reason)
        if request_id in self.queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        require_runner(self.pooler, "generate", "this endpoint")
        core_requests = self.input_processor.make_requests(request_id, prompt_token_ids, params, priority,
                                                           trace_headers, cache_salt, lora_request, mm_features)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self.children[request_id] = [r.request_id for r in core_requests]
        self.output_processor.add_requests(request_id, prompt, core_requests, stream)
        finished = False
        try:
            await self.client.add(core_requests)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.queues.pop(request_id, None)
            child_ids = self.children.pop(request_id, [])
            if not finished:  # cancelled, failed or refused: nothing of it may stay in the core
                self.output_processor.abort_all(child_ids)
                self.client.abort(child_ids)

    async def encode(self, request_ids: list[str], token_ids: list[list[int]], params: PoolingParams,
                     field: str = "input") -> list[list[float]]:
        """Pool several prompts as one admission (all or none); their vectors in order. Raises
        ValueError naming `field` for bad input, QueueFullError / EngineDeadError as generate."""
        if not self.client.alive:
            raise EngineDeadError(self.client.dead_reason)
        require_runner(self.pooler, "pooling", "this endpoint")
        check_pooling_params(params, self.pooler)
        requests = [make_pooling_request(self.input_processor, rid, ids, params,
                                         field=f"{field}[{i}]" if len(token_ids) > 1 else field)
                    for i, (rid, ids) in enumerate(zip(request_ids, token_ids))]
        loop = asyncio.get_running_loop()
        futures = [self.pooled.setdefault(rid, loop.create_future()) for rid in request_ids]
        try:
            await self.client.add(requests)
            return list(await asyncio.gather(*futures))
        finally:
            unfinished = [rid for rid, future in zip(request_ids, futures) if not future.done()]
            for rid in request_ids:
                self.pooled.pop(rid, None)
            self.client.abort(unfinished)

    def abort_all(self) -> None:
        """Abort every request in the core; each ends normally with finish_reason "abort"."""
        self.client.abort([c for ids in self.children.values() for c in ids])

    async def metrics_text(self) -> bytes:
        return await self.client.metrics_text()

    async def call_utility(self, method: str, *args):
        """A control call to the core (reset_prefix_cache, sleep, wake_up, is_sleeping)."""
        return await self.client.call_utility(method, *args)

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        if self.pooled:
            self._on_pooled(outputs)
        results, to_abort = self.output_processor.process_outputs(outputs)
        self.client.abort(to_abort)
        for result in results:
            queue = self.queues.get(result.request_id)
            if queue is not None:
                queue.put_nowait(result)

    def _on_pooled(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            future = self.pooled.get(out.request_id)
            if future is None or future.done() or out.finish_reason is None:
                continue
            if out.pooling_output is None:
                future.set_exception(ValueError(out.error or f"request {out.request_id} ended: {out.finish_reason}"))
            else:
                future.set_result(out.pooling_output)

    def _on_dead(self, reason: str) -> None:
        for queue in self.queues.values():
            queue.put_nowait(EngineDeadError(reason))
        for future in self.pooled.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))

    def close(self) -> None:
        self.client.close()
