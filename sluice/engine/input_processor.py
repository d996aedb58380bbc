"""User prompts -> validated, tokenized EngineCoreRequests (before any engine state changes)."""

from __future__ import annotations

from typing import Any, Union

from sluice.core.kv_cache_manager import KVCacheSpec
from sluice.engine.messages import EngineCoreRequest
from sluice.lora.request import LoRARequest
from sluice.multimodal.inputs import MultiModalFeature
from sluice.multimodal.processor import MultiModalProcessor
from sluice.sampling_params import SamplingParams
from sluice.structured_output.backend import check_spec

PromptType = Union[str, list[int], dict[str, Any]]


def truncate_prompt(prompt_token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """The last truncate_prompt_tokens tokens of the prompt (-1: the last max_model_len), vLLM's
    truncate_prompt_tokens; more than max_model_len is an error naming the field."""
    if truncate_prompt_tokens is None:
        return prompt_token_ids
    if truncate_prompt_tokens > max_model_len:
        raise ValueError(f"truncate_prompt_tokens={truncate_prompt_tokens} is larger than "
                         f"max_model_len={max_model_len}")
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return prompt_token_ids[-keep:]


def bad_words_token_ids(tokenizer, bad_words: list[str]) -> list[list[int]]:
    """vLLM's reading of bad_words: each word's ids as written, and with a leading space when that
    is a different token sequence of the same length (the word in the middle of a sentence)."""
    sequences: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        sequences.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return sequences


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, eos_token_ids: tuple[int, ...] = (),
                 scheduling_policy: str = "fcfs", kv_cache: KVCacheSpec | None = None, *,
                 max_logprobs: int, mm_processor: MultiModalProcessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.mm_processor = mm_processor  # a vision-language model's: prompts may hold images
        self.kv_cache = kv_cache  # None: unchecked
        self.max_logprobs = max_logprobs  # -1: no limit
        self.scheduling_policy = scheduling_policy
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = tuple(sorted(eos | set(eos_token_ids)))
        # No token stands for more characters than its own spelling in the vocabulary (byte-level
        # and byte-fallback spellings are longer than the text), so a text longer than this
        # cannot fit in max_model_len tokens.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = max_model_len * self.max_token_chars

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize a prompt, first refusing without tokenizing one too long to ever fit: a huge
        prompt would otherwise cost seconds and gigabytes before its length check."""
        self.check_chars(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_chars(self, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise ValueError(
                f"prompt has {len(text)} characters, more than {self.max_model_len} tokens (max_model_len) "
                f"of at most {self.max_token_chars} characters each (the tokenizer's longest token) can hold"
            )

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Accepts a string, a list of token ids, or vLLM's {"prompt"} / {"prompt_token_ids"} dicts."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs a 'prompt' or 'prompt_token_ids' key")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_token_ids(list(prompt))
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def process_prompt(self, prompt: PromptType) -> tuple[str | None, list[int], list[MultiModalFeature] | None]:
        """tokenize_prompt, plus vLLM's {"prompt": text, "multi_modal_data": {"image": PIL image(s)}}:
        the text holds the model's image placeholder once per image."""
        if not isinstance(prompt, dict) or prompt.get("multi_modal_data") is None:
            return *self.tokenize_prompt(prompt), None
        data = prompt["multi_modal_data"]
        if self.mm_processor is None:
            raise ValueError("multi_modal_data: this model takes text only")
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise ValueError(f"multi_modal_data must be a dict with the key 'image'; got {data!r:.80}")
        if not isinstance(prompt.get("prompt"), str):
            raise ValueError("multi_modal_data needs a text 'prompt' holding the model's image placeholder "
                             f"({self.mm_processor.placeholder}) once per image")
        self.check_chars(prompt["prompt"])
        images = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
        images = self.mm_processor.load_images([(image, f"multi_modal_data.image[{i}]")
                                                for i, image in enumerate(images)])
        return prompt["prompt"], *self.mm_processor.process(prompt["prompt"], images, add_special_tokens=True)

    def _check_token_ids(self, token_ids: list) -> list[int]:
        if not token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        for token_id in token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"prompt_token_ids must be ints in [0, {self.vocab_size}); got {token_id!r}"
                )
        return list(token_ids)

    def make_requests(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      priority: int = 0, trace_headers: dict[str, str] | None = None,
                      cache_salt: str | None = None, lora_request: LoRARequest | None = None,
                      mm_features: list[MultiModalFeature] | None = None) -> list[EngineCoreRequest]:
        """One user request -> its core requests: n > 1 runs as n children `{id}-{index}`;
        seeded children get seed + index so that they differ."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        kept = truncate_prompt(prompt_token_ids, params.truncate_prompt_tokens, self.max_model_len)
        if mm_features and len(kept) != len(prompt_token_ids):
            raise ValueError(f"truncate_prompt_tokens={params.truncate_prompt_tokens} would cut a prompt that holds "
                             "images; send a shorter prompt instead")
        prompt_token_ids = kept
        self._prepare_token_controls(params)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError("cache_salt must be a non-empty string")
        if params.n == 1:
            return [self.make_request(request_id, prompt_token_ids, params, priority, trace_headers=trace_headers,
                                      cache_salt=cache_salt, lora_request=lora_request, mm_features=mm_features)]
        children = []
        for index in range(params.n):
            child = params.clone()
            if child.seed is not None:
                child.seed += index
            children.append(self.make_request(f"{request_id}-{index}", prompt_token_ids, child, priority,
                                              trace_headers=trace_headers, cache_salt=cache_salt,
                                              lora_request=lora_request, mm_features=mm_features))
        return children

    def _prepare_token_controls(self, params: SamplingParams) -> None:
        """Token ids of logit_bias / allowed_token_ids must be in the vocabulary; bad_words are
        tokenized here, once, for the sampler."""
        for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} token ids must be in [0, {self.vocab_size}), got {bad}")
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """The one admission rule, offline and on the server (which answers 400): the prompt plus
        one generated token fit max_model_len and the whole KV cache; so does max_tokens."""
        if not num_prompt_tokens:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens; max_model_len is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens={max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds "
                f"max_model_len={self.max_model_len}; ask for at most {self.max_model_len - num_prompt_tokens}"
            )
        if self.kv_cache is not None and not self.kv_cache.fits(num_prompt_tokens + 1):
            raise ValueError(f"prompt has {num_prompt_tokens} tokens plus one generated: "
                             f"{self.kv_cache.describe(num_prompt_tokens + 1)}")

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     priority: int = 0, arrival_time: float | None = None,
                     trace_headers: dict[str, str] | None = None, cache_salt: str | None = None,
                     lora_request: LoRARequest | None = None,
                     mm_features: list[MultiModalFeature] | None = None) -> EngineCoreRequest:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        self.check_fits(len(prompt_token_ids), params.max_tokens)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if priority != 0 and self.scheduling_policy != "priority":
            raise ValueError(f"priority={priority} needs scheduling_policy='priority' (this engine runs "
                             f"{self.scheduling_policy!r})")
        self._check_logprobs(params)
        if params.structured_outputs is not None:
            check_spec(params.structured_outputs)  # a bad spec fails here, not in the core
        extra = {} if arrival_time is None else {"arrival_time": arrival_time}
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            priority=priority,
            cache_salt=cache_salt,
            trace_headers=trace_headers,
            lora_request=lora_request,
            mm_features=mm_features,
            **extra,
        )

    def _check_logprobs(self, params: SamplingParams) -> None:
        """vLLM's --max-logprobs: the most logprobs / prompt_logprobs a request may ask for."""
        if self.max_logprobs == -1:
            return
        for name in ("logprobs", "prompt_logprobs"):
            wanted = getattr(params, name)
            count = self.vocab_size if wanted == -1 else wanted
            if count is not None and count > self.max_logprobs:
                raise ValueError(f"{name}={wanted} is more than max_logprobs={self.max_logprobs}, the most this "
                                 "server returns (--max-logprobs)")
