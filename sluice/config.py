"""Engine configuration: one dataclass per concern, built once from LLM kwargs or CLI flags.

Every limit is validated here, at the edge, with an error that names the field and the limit;
the rest of the engine trusts these values.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields

import torch

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a user dtype to a torch dtype; "auto" picks the fastest one on this machine.

    On CPU that is bfloat16 whenever oneDNN can run bf16 matmuls natively (AMX / AVX512-BF16),
    about 5x faster than float32 here; otherwise float32.
    """
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name == "auto":
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16; got {dtype!r}")
    return SUPPORTED_DTYPES[name]


def _cpu_has_fast_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where that can't be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    model: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None: the model's own context length
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        _check(
            self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1),
            f"max_model_len must be an int >= 1, got {self.max_model_len!r}",
        )
        self.torch_dtype = resolve_dtype(self.dtype)


@dataclass
class CacheConfig:
    block_size: int = 64
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # exact number of KV blocks (vLLM's name)
    kv_cache_memory_bytes: int | None = None  # bytes of KV cache; None: a fraction of free memory
    kv_cache_memory_fraction: float = 0.2  # of available memory, used when no size is given

    def __post_init__(self) -> None:
        _check(
            isinstance(self.block_size, int) and 2 <= self.block_size <= 256 and self.block_size % 2 == 0,
            f"block_size must be an even int in [2, 256], got {self.block_size!r}",
        )
        _check(
            self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
            f"num_gpu_blocks_override must be >= 2 (one block is reserved), got {self.num_gpu_blocks_override!r}",
        )
        _check(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes!r}",
        )
        _check(
            0.0 < self.kv_cache_memory_fraction <= 0.95,
            f"kv_cache_memory_fraction must be in (0, 0.95], got {self.kv_cache_memory_fraction!r}",
        )


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0  # per-request chunk cap; 0: a quarter of the token budget
    max_num_partial_prefills: int = 4  # prompts that may be mid-prefill in one step
    scheduling_policy: str = "fcfs"
    # Backpressure: refuse new requests (the server answers 503) while the waiting queue holds
    # this many requests / prompt tokens still to compute. None: unlimited.
    max_num_queued_reqs: int | None = None
    max_num_queued_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 1), f"{name} must be an int >= 1, got {value!r}")
        _check(
            isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
            f"max_num_seqs must be an int >= 1, got {self.max_num_seqs!r}",
        )
        _check(
            isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be an int >= 1, got {self.max_num_batched_tokens!r}",
        )
        _check(
            self.long_prefill_token_threshold >= 0,
            f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold!r}",
        )
        _check(
            self.max_num_partial_prefills >= 1,
            f"max_num_partial_prefills must be >= 1, got {self.max_num_partial_prefills!r}",
        )
        _check(
            self.scheduling_policy in ("fcfs", "priority"),
            f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}",
        )
        if self.long_prefill_token_threshold == 0:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens // 4)


DETAILED_TRACE_MODULES = ("model", "worker", "all")


@dataclass
class ObservabilityConfig:
    # The model_name label of every metric and span: the first served name (default: the model).
    served_model_name: str | list[str] | None = None
    disable_log_stats: bool = False  # the periodic throughput / queue / KV log line
    kv_cache_metrics: bool = False  # block lifetime, idle-before-evict and reuse-gap histograms
    otlp_traces_endpoint: str | None = None  # one span per request, exported over OTLP
    collect_detailed_traces: str | None = None  # adds per-step spans: model | worker | all

    def __post_init__(self) -> None:
        if isinstance(self.served_model_name, (list, tuple)):
            self.served_model_name = self.served_model_name[0] if self.served_model_name else None
        _check(
            self.collect_detailed_traces in (None, *DETAILED_TRACE_MODULES),
            f"collect_detailed_traces must be one of {', '.join(DETAILED_TRACE_MODULES)}, "
            f"got {self.collect_detailed_traces!r}",
        )
        _check(
            self.collect_detailed_traces is None or bool(self.otlp_traces_endpoint),
            "collect_detailed_traces needs otlp_traces_endpoint (where would the spans go?)",
        )


@dataclass
class StructuredOutputsConfig:
    # A grammar still compiling this many seconds after its request arrived fails the request.
    structured_outputs_compile_timeout: float = 30.0
    # JSON grammars allow free runs of whitespace (vLLM's form) instead of compact JSON.
    structured_outputs_any_whitespace: bool = False

    def __post_init__(self) -> None:
        timeout = self.structured_outputs_compile_timeout
        _check(
            not isinstance(timeout, bool) and isinstance(timeout, (int, float)) and 0 < timeout < float("inf"),
            f"structured_outputs_compile_timeout must be a number of seconds > 0, got {timeout!r}",
        )
        _check(
            isinstance(self.structured_outputs_any_whitespace, bool),
            f"structured_outputs_any_whitespace must be a bool, got {self.structured_outputs_any_whitespace!r}",
        )


EXECUTOR_BACKENDS = ("uni", "mp")


@dataclass
class ParallelConfig:
    # Where the worker runs: "uni" in the engine core's process, "mp" in a process of its own.
    distributed_executor_backend: str = "uni"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(
            self.distributed_executor_backend in EXECUTOR_BACKENDS,
            f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
            f"got {self.distributed_executor_backend!r}",
        )
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            _check(getattr(self, name) == 1, f"{name} must be 1 (one worker per engine for now), "
                                             f"got {getattr(self, name)!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "observability": ObservabilityConfig, "structured_outputs": StructuredOutputsConfig,
             "parallel": ParallelConfig}

    @property
    def model_name(self) -> str:
        """The name metrics and spans carry."""
        from sluice.loader import DEFAULT_MODEL  # the loader imports this module

        return self.observability.served_model_name or self.model.model or DEFAULT_MODEL

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every flat engine argument (an LLM kwarg / CLI flag)."""
        return {f.name for dc in cls.PARTS.values() for f in fields(dc)}

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Route flat vLLM-style keyword arguments to the dataclass that owns them."""
        parts = cls.PARTS
        buckets: dict[str, dict] = {name: {} for name in parts}
        for key, value in kwargs.items():
            owner = next((name for name, dc in parts.items() if key in {f.name for f in fields(dc)}), None)
            if owner is None:
                raise TypeError(f"unknown engine argument {key!r}")
            if value is not None or key in ("model", "max_model_len"):
                buckets[owner][key] = value
        return cls(**{name: parts[name](**buckets[name]) for name in parts})


def cache_dir(*parts: str) -> str:
    """Where sluice keeps derived files (built kernels, GGUF tokenizer sidecars).

    $SLUICE_CACHE_DIR, else $XDG_CACHE_HOME/sluice, else ~/.cache/sluice.
    """
    root = os.environ.get("SLUICE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sluice"
    )
    return os.path.join(root, *parts)


def available_memory_bytes() -> int:
    """Memory the OS can still give us (MemAvailable), the CPU analogue of free GPU memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
