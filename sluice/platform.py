"""The machine sluice runs on, decided once at load: device, CPU model and the CPU's bf16 features.

The platform picks the attention backend (sluice/layers/attention) and says whether the packed
native linear kernel may run at all (sluice/layers/linear.py times it against torch per shape).
It logs its choice once per device.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; empty where that can't be read."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where that can't be read."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9R14", "Intel(R) Xeon(R) ..."), or the machine type."""
    import platform as stdlib_platform

    return _cpuinfo().get("model name") or stdlib_platform.processor() or stdlib_platform.machine()


def cache_dir(*parts: str) -> str:
    """Where sluice keeps derived files (built kernels, linear-path timings, GGUF tokenizer sidecars).

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


def native_disabled() -> bool:
    """SLUICE_DISABLE_NATIVE=1 forces the portable PyTorch paths (what CI's second leg runs)."""
    return os.environ.get("SLUICE_DISABLE_NATIVE") == "1"


@dataclass(frozen=True)
class Platform:
    device: torch.device
    cpu_model: str
    cpu_flags: frozenset[str]

    @property
    def bf16_isa(self) -> str:
        """The CPU's fastest bf16 matmul instructions: "amx", "avx512_bf16" or "none"."""
        if "amx_bf16" in self.cpu_flags:
            return "amx"
        return "avx512_bf16" if "avx512_bf16" in self.cpu_flags else "none"

    @property
    def cpu_key(self) -> str:
        """Names this CPU in on-disk cache keys: a build or a timing made on one CPU is never
        reused on another that shares the cache (a container image, a shared home)."""
        return f"{self.cpu_model}|{' '.join(sorted(self.cpu_flags))}"

    def native_kernels(self, dtype: torch.dtype) -> bool:
        """Whether sluice's C kernels (AVX-512 BF16) can serve tensors of this dtype here: the one
        answer the attention backend, the linear path and the element-wise kernels all use."""
        return dtype == torch.bfloat16 and self._native_bf16

    @functools.cached_property
    def _native_bf16(self) -> bool:
        return self.device.type == "cpu" and "avx512_bf16" in self.cpu_flags and self._native_library

    @functools.cached_property
    def _native_library(self) -> bool:
        """Whether sluice's C kernels built and loaded here (any CPU with a compiler)."""
        from sluice.layers import native

        return native.load_library() is not None

    def attention_backend_name(self, dtype: torch.dtype, num_heads: int, head_dim: int,
                               kv_cache_dtype: str = "auto") -> str:
        """"native" where the C kernels serve the shape, else "torch" (any CPU, CUDA). A compact KV
        cache (int8 / fp8) the C kernel reads on any CPU that built it, in bf16 or float32."""
        from sluice.layers.attention.native_backend import NativeBackend

        if kv_cache_dtype != "auto":
            native_ok = self.device.type == "cpu" and self._native_library
        else:
            native_ok = self.native_kernels(dtype)
        return "native" if native_ok and NativeBackend.supports(num_heads, head_dim) else "torch"


@functools.lru_cache(maxsize=None)
def _platform(device: torch.device) -> Platform:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA device")
    found = Platform(device, cpu_model(), cpu_flags())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    logger.info("platform: %s; CPU %s, bf16 instructions: %s; native kernels %s", where, found.cpu_model,
                found.bf16_isa, "disabled (SLUICE_DISABLE_NATIVE=1)" if native_disabled() else "allowed")
    return found


def current_platform(device: torch.device | str | None = None) -> Platform:
    """The platform of `device` (default: torch's default device, which the model runner sets
    while it builds the model), decided once per device."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return _platform(device)
