"""Offline batch inference: `LLM(...).generate(...)` / `.chat(...)`, vLLM's offline API."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from sluice.config import EngineConfig
from sluice.engine.core import EngineCore
from sluice.engine.input_processor import InputProcessor, PromptType
from sluice.engine.output_processor import OutputProcessor
from sluice.loader import generation_defaults, get_tokenizer, load_eos_token_ids, load_hf_config, model_source
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.multimodal.processor import multimodal_processor, split_images
from sluice.outputs import RequestOutput
from sluice.pooling.config import check_pooling_params, require_runner
from sluice.pooling.inputs import make_pooling_request, pair_token_ids
from sluice.pooling.outputs import (ClassificationOutput, EmbeddingOutput, PoolingOutput, PoolingRequestOutput,
                                    ScoringOutput, class_probs)
from sluice.pooling.params import PoolingParams
from sluice.sampling_params import SamplingParams

logger = logging.getLogger("sluice")

# Where offline use differs from serving: a progress bar instead of the periodic stats line (as vLLM's LLM).
OFFLINE_DEFAULTS = {"disable_log_stats": True}


class LLM:
    """An engine core driven in-process, with tokenization and detokenization around it."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        """`kwargs` are the engine arguments of sluice.config (vLLM's names), with their defaults
        there; offline runs change only OFFLINE_DEFAULTS."""
        given = {name: value for name, value in kwargs.items() if value is not None}
        self.config = EngineConfig.from_kwargs(model=model, **{**OFFLINE_DEFAULTS, **given})
        if len(self.config.parallel.local_ranks()) > 1:
            raise ValueError(f"data_parallel_size={self.config.parallel.data_parallel_size}: LLM(...) runs one engine "
                             "in this process; serve replicas with `sluice serve --data-parallel-size N`, or run one "
                             "LLM per rank with data_parallel_rank=R")
        for note in self.config.notes():
            logger.info(note)
        torch.manual_seed(self.config.model.seed)
        source = model_source(self.config)
        hf_config = load_hf_config(source, self.config.model.hf_overrides)
        self.tokenizer = get_tokenizer(self.config)
        self.default_sampling_params = generation_defaults(source, self.config.model)
        self.engine_core = EngineCore(self.config, hf_config, source)
        # Offline batches start at full speed: fault the KV cache in now rather than inside their steps.
        started = time.perf_counter()
        self.engine_core.executor.populate_kv()
        logger.info("KV cache resident in %.1f s", time.perf_counter() - started)
        self.input_processor = InputProcessor(
            self.tokenizer, self.engine_core.max_model_len, hf_config.get_text_config().vocab_size,
            load_eos_token_ids(source),
            self.config.scheduler.scheduling_policy, self.engine_core.kv.spec,
            max_logprobs=self.config.model.max_logprobs,
            mm_processor=multimodal_processor(self.config, source, hf_config, self.tokenizer),
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._request_counter = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults (--generation-config), used
        when generate() gets none, as vLLM's LLM does."""
        return SamplingParams(**self.default_sampling_params)

    def get_tokenizer(self):
        return self.tokenizer

    def get_metrics(self) -> dict[str, float]:
        """The engine's counters and gauges under vLLM's metric names (labels summed)."""
        return self.engine_core.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's LLM.reset_prefix_cache)."""
        return self.engine_core.reset_prefix_cache()

    def sleep(self, level: int = 1) -> dict:
        """Give the idle engine's memory back: weights to a disk-backed file, KV cache dropped.
        Returns the RSS before and after; call wake_up() before generating at full speed."""
        return self.engine_core.sleep(level)

    def wake_up(self) -> dict:
        return self.engine_core.wake_up()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; results come back in input order. lora_request: one adapter
        for every prompt, or one (or None: the base model) per prompt."""
        require_runner(self.engine_core.pooler, "generate", "generate()")
        # vLLM's prompt-dict key cache_salt; images come as {"prompt", "multi_modal_data": {"image": ...}}
        processed = [(*self.input_processor.process_prompt(prompt),
                      prompt.get("cache_salt") if isinstance(prompt, dict) else None)
                     for prompt in self._as_list(prompts)]
        return self._generate(processed, sampling_params, priority, use_tqdm, lora_request)

    def _generate(self, prompts: list[tuple[str | None, list[int], list[MultiModalFeature] | None, str | None]],
                  sampling_params, priority, use_tqdm: bool, lora_request) -> list[RequestOutput]:
        """Run processed prompts (text, token ids, images, cache salt) to completion, in input order."""
        params_list = self._per_prompt(sampling_params or self.get_default_sampling_params(), len(prompts),
                                       "sampling_params")
        priorities = self._per_prompt(priority if priority is not None else 0, len(prompts), "priority")
        loras = self._per_prompt(lora_request, len(prompts), "lora_request")
        self._add_loras(loras)
        # Validate everything before the first request reaches the engine.
        batch = []
        for (text, token_ids, mm_features, salt), params, prio, lora in zip(prompts, params_list, priorities, loras):
            request_id = str(next(self._request_counter))
            batch.append((request_id, text, self.input_processor.make_requests(
                request_id, token_ids, params, prio, cache_salt=salt, lora_request=lora, mm_features=mm_features)))
        for request_id, text, core_requests in batch:
            self.output_processor.add_requests(request_id, text, core_requests)
            for core_req in core_requests:
                self.engine_core.add_request(core_req)
        order = {request_id: i for i, (request_id, _, _) in enumerate(batch)}
        core_ids = [core_req.request_id for _, _, children in batch for core_req in children]
        results = self._run(len(order), use_tqdm, core_ids)
        return sorted(results, key=lambda r: order[r.request_id])

    def _add_loras(self, loras: list[LoRARequest | None]) -> None:
        """Load each adapter once (a bad one raises a ValueError naming what is wrong) before any
        request reaches the engine."""
        for lora in dict.fromkeys(lora for lora in loras if lora is not None):
            if not isinstance(lora, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got {type(lora).__name__}")
            self.engine_core.add_lora(lora)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (with `tools`, OpenAI's tool
        definitions, where the template shows them), then generate. Image parts (OpenAI's
        {"type": "image_url", "image_url": {"url": ...}}, or vLLM's {"type": "image_pil",
        "image_pil": PIL image}) go to a vision-language model's processor."""
        require_runner(self.engine_core.pooler, "generate", "chat()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        mm = self.input_processor.mm_processor
        prompts = []
        for conversation in conversations:
            conversation, images = split_images(conversation, "openai", mm.placeholder if mm else "")
            if images and mm is None:
                raise ValueError(f"{images[0][1]}: this model takes text only")
            text = self.tokenizer.apply_chat_template(
                conversation, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template,
                **(chat_template_kwargs or {}),
            )
            if mm is None:
                prompts.append((text, self.tokenizer.encode(text, add_special_tokens=False), None, None))
            else:  # the template holds the special tokens already
                self.input_processor.check_chars(text)
                prompts.append((text, *mm.process(text, mm.load_images(images), add_special_tokens=False), None))
        return self._generate(prompts, sampling_params, None, use_tqdm, None)

    # ---- pooling (runner="pooling") -------------------------------------------------------
    def encode(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
               truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """The pooled hidden state of each prompt, as a tensor (vLLM's LLM.encode)."""
        params = pooling_params or PoolingParams(task="encode")
        results = self._pool(self._prompt_token_ids(prompts), params, truncate_prompt_tokens)
        return [PoolingRequestOutput(rid, PoolingOutput(torch.tensor(vector)), ids) for rid, ids, vector in results]

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
              truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """One embedding per prompt (EmbeddingRequestOutput: .outputs.embedding)."""
        params = pooling_params or PoolingParams(task="embed")
        results = self._pool(self._prompt_token_ids(prompts), params, truncate_prompt_tokens)
        return [PoolingRequestOutput(rid, EmbeddingOutput(vector), ids) for rid, ids, vector in results]

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """Class probabilities of a *ForSequenceClassification model (ClassificationRequestOutput)."""
        results = self._pool(self._prompt_token_ids(prompts), PoolingParams(task="classify"), truncate_prompt_tokens)
        return [PoolingRequestOutput(rid, ClassificationOutput(class_probs(logits)), ids)
                for rid, ids, logits in results]

    def reward(self, prompts: PromptType | Sequence[PromptType],
               truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """vLLM's reward: a *ForSequenceClassification model's raw head logits at every prompt token,
        .outputs.data of shape [num_tokens, num_labels] (an outcome reward model's score is the last row)."""
        results = self._pool(self._prompt_token_ids(prompts), PoolingParams(task="reward"), truncate_prompt_tokens)
        return [PoolingRequestOutput(rid, PoolingOutput(torch.tensor(flat).reshape(len(ids), -1)), ids)
                for rid, ids, flat in results]

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str],
              truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """A cross-encoder's relevance of each (query, document) pair: one query against many
        documents, or pairwise lists of equal length (ScoringRequestOutput: .outputs.score)."""
        queries = [data_1] if isinstance(data_1, str) else list(data_1)
        documents = [data_2] if isinstance(data_2, str) else list(data_2)
        if len(queries) == 1:
            queries = queries * len(documents)
        if len(queries) != len(documents) or not documents:
            raise ValueError(f"score needs one query or as many queries as documents; got {len(queries)} "
                             f"and {len(documents)}")
        token_ids = [pair_token_ids(self.input_processor, q, d) for q, d in zip(queries, documents)]
        results = self._pool(token_ids, PoolingParams(task="classify"), truncate_prompt_tokens)
        return [PoolingRequestOutput(rid, ScoringOutput(class_probs(logits[:1])[0]), ids)
                for rid, ids, logits in results]

    @staticmethod
    def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        """One prompt (a string, a dict, a list of token ids) or a sequence of them -> a list."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def _prompt_token_ids(self, prompts: PromptType | Sequence[PromptType]) -> list[list[int]]:
        return [self.input_processor.tokenize_prompt(prompt)[1] for prompt in self._as_list(prompts)]

    def _pool(self, token_ids: list[list[int]], params: PoolingParams,
              truncate_prompt_tokens: int | None) -> list[tuple[str, list[int], list[float]]]:
        """Run pooling requests to their end: (request id, prompt ids, vector), in input order."""
        require_runner(self.engine_core.pooler, "pooling", "encode/embed/classify/score/reward()")
        check_pooling_params(params, self.engine_core.pooler)
        requests = [make_pooling_request(self.input_processor, str(next(self._request_counter)), ids, params,
                                         truncate_prompt_tokens) for ids in token_ids]
        vectors: dict[str, list[float]] = {}
        for request in requests:
            self.engine_core.add_request(request)
        try:
            while len(vectors) < len(requests):
                for out in self.engine_core.step():
                    if out.error is not None:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                    if out.pooling_output is not None:
                        vectors[out.request_id] = out.pooling_output
        except BaseException:
            self.engine_core.abort_requests([r.request_id for r in requests])
            raise
        return [(r.request_id, r.prompt_token_ids, vectors[r.request_id]) for r in requests]

    # ---- internals ----------------------------------------------------------------------
    @staticmethod
    def _per_prompt(value, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
            return list(value)
        return [value] * count

    def _run(self, num_results: int, use_tqdm: bool, core_ids: list[str]) -> list[RequestOutput]:
        results: list[RequestOutput] = []
        bar = tqdm(total=num_results, desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        started, num_out_tokens = time.monotonic(), 0
        try:
            while self.output_processor.has_unfinished():
                outputs = self.engine_core.step()
                finished, to_abort = self.output_processor.process_outputs(outputs)
                if to_abort:
                    self.engine_core.abort_requests(to_abort)
                for result in finished:
                    results.append(result)
                    num_out_tokens += sum(len(c.token_ids) for c in result.outputs)
                    bar.set_postfix_str(f"output {num_out_tokens / (time.monotonic() - started):.1f} tok/s")
                    bar.update(1)
        except BaseException:
            # Leave the engine clean for the next call: nothing of this batch stays queued.
            self.engine_core.abort_requests(core_ids)
            self.output_processor.abort_all(core_ids)
            raise
        finally:
            bar.close()
        return results
