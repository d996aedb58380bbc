"""User-facing sampling parameters, with vLLM's names, defaults and semantics."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sluice.distributed.kv_transfer.params import check_kv_transfer_params
from sluice.structured_output.params import StructuredOutputsParams

__all__ = ["SamplingParams", "SamplingType", "StructuredOutputsParams"]

# Temperatures below this are treated as greedy decoding (as in vLLM).
_SAMPLING_EPS = 1e-5


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _check_int(name: str, value: object) -> int:
    # bool is a subclass of int; n=True is almost surely a bug, so refuse it.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass
class SamplingParams:
    """How to sample one request's completions.

    Field names and defaults follow vLLM so that existing client code and
    OpenAI-style request translation work unchanged.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len (the engine fills it in)
    min_tokens: int = 0
    logprobs: int | None = None  # -1: whole vocabulary
    prompt_logprobs: int | None = None  # -1: whole vocabulary
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output to a grammar
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # sample only these
    bad_words: list[str] | None = None  # words never generated (vLLM's semantics: see bad_words_token_ids)
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens (-1: max_model_len)
    extra_args: dict[str, Any] | None = None  # vLLM's: e.g. {"kv_transfer_params": {...}} (disaggregated prefill)
    # Filled by the engine from bad_words (each word's ids, with and without a leading space).
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self._normalise_lists()
        self._verify()
        if self.greedy:
            # Greedy decoding ignores these; resetting them lets the sampler
            # skip the work for greedy rows entirely.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0

    def _normalise_lists(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a str or a list of str, got {type(self.stop).__name__}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {type(s).__name__} {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")

        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(
                f"stop_token_ids must be a list of int, got {type(self.stop_token_ids).__name__}"
            )
        for t in self.stop_token_ids:
            if _check_int("stop_token_ids", t) < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {t}")

    def _verify(self) -> None:
        if _check_int("n", self.n) < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.temperature = _check_float("temperature", self.temperature)
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if _check_int("top_k", self.top_k) < -1:
            raise ValueError(f"top_k must be -1 (disable) or >= 0, got {self.top_k}")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None and _check_int("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if _check_int("min_tokens", self.min_tokens) < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and _check_int(name, value) < -1:
                raise ValueError(f"{name} must be >= 0 (or -1 for the whole vocabulary), got {value}")
        for name in (
            "ignore_eos",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._verify_token_controls()
        if self.extra_args is not None:
            if not isinstance(self.extra_args, dict):
                raise ValueError(f"extra_args must be a dict, got {type(self.extra_args).__name__}")
            check_kv_transfer_params(self.extra_args.get("kv_transfer_params"))
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

    def _verify_token_controls(self) -> None:
        """Token ids are checked against the vocabulary by the engine, which knows its size."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            self.logit_bias = {_check_int("logit_bias", k): _check_float("logit_bias", v)
                               for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = [_check_int("allowed_token_ids", t) for t in self.allowed_token_ids]
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
        if self.bad_words is not None:
            if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
                raise ValueError("bad_words must be a list of non-empty strings")
        keep = self.truncate_prompt_tokens
        if keep is not None and (_check_int("truncate_prompt_tokens", keep) < -1 or keep == 0):
            raise ValueError(f"truncate_prompt_tokens must be -1 (max_model_len) or >= 1, got {keep}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.greedy:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def clone(self) -> SamplingParams:
        """A deep copy, so per-request edits (e.g. filling max_tokens) never leak between requests."""
        return copy.deepcopy(self)
