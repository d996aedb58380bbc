"""Small C kernels for the CPU hot path, built once with the system compiler and loaded with ctypes.

Plain C with a C ABI (no torch headers) compiles in a few seconds, so the first start
builds it and later starts reuse the cached library. Without a compiler, or with
SLUICE_DISABLE_NATIVE=1, callers fall back to the PyTorch path.

The kernels parallelise with OpenMP. The library names libgomp.so.1, which the loader
resolves to the copy PyTorch already loaded (torch is imported first), so our loops and
torch's share one pool of worker threads instead of two pools fighting over the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sluice.platform import cache_dir, current_platform, native_disabled

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("attention.c", "elementwise.c", "gemm.c", "quant.c",
                                                                   "moe.c", "lora.c", "decoder.c")]
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("bf16_simd.h", "simd_math.h")]
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-fopenmp"]
# epilogues of linear_bf16 (gemm.c: all but GELU) and linear_int8 (quant.c: all but SILU_MUL)
EPI_STORE, EPI_RESIDUAL, EPI_SILU_MUL, EPI_GELU = 0, 1, 2, 3
PANEL = 64  # output columns per packed weight panel


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they can't be built here."""
    if native_disabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found; using the PyTorch path")
        return None
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    # -march=native: a library built on one CPU must never load on another sharing the cache
    cpu = current_platform("cpu").cpu_key
    key = hashlib.sha256(source + " ".join(CFLAGS).encode() + cpu.encode()).hexdigest()[:16]
    target = Path(cache_dir("kernels")) / f"sluice-kernels-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("building the native kernels for this CPU (once; a minute or two on 2 cores)")
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                # generous: on a busy machine a timeout here would silently fall back to PyTorch
                subprocess.run([compiler, *CFLAGS, "-o", str(built), *map(str, SOURCES), "-lm"],
                               check=True, capture_output=True, timeout=900)
                os.replace(built, target)  # atomic: concurrent builders never see half a file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("could not build native kernels (%s %s); using the PyTorch path", exc, detail.decode()[-500:])
        return None
    fn = lib.paged_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] * 2 + [ctypes.c_int] * 2
    lib.paged_attention_kv8.restype = ctypes.c_int
    lib.paged_attention_kv8.argtypes = fn.argtypes[:-1] + [ctypes.c_int] * 2
    lib.write_kv.restype = None
    lib.write_kv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5
    lib.silu_mul_bf16.restype = ctypes.c_int
    lib.silu_mul_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.rotary_bf16.restype = ctypes.c_int
    lib.rotary_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.rms_norm_bf16.restype = ctypes.c_int
    lib.rms_norm_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.rope_qkv_cache_bf16.restype = ctypes.c_int
    lib.rope_qkv_cache_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5
    lib.argmax_bf16.restype = ctypes.c_int
    lib.argmax_bf16.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.pack_linear_bf16.restype = ctypes.c_int
    lib.pack_linear_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.linear_bf16.restype = ctypes.c_int
    lib.linear_bf16.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64]
                                + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int])
    lib.decoder_stack_bf16.restype = ctypes.c_int
    lib.decoder_stack_bf16.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 2
                                       + [ctypes.c_int64] * 5 + [ctypes.c_float] * 2 + [ctypes.c_void_p] * 3
                                       + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p]
                                       + [ctypes.c_int])
    # quantized linear layers (quant.c; called from sluice/quantization)
    lib.linear_gguf.restype = ctypes.c_int
    lib.linear_gguf.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64])
    lib.linear_gguf_x16.restype = ctypes.c_int
    lib.linear_gguf_x16.argtypes = lib.linear_gguf.argtypes
    lib.repacked_gguf_bytes.restype = ctypes.c_int64
    lib.repacked_gguf_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.repack_gguf.restype = ctypes.c_int
    lib.repack_gguf.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.unrepack_gguf.restype = ctypes.c_int
    lib.unrepack_gguf.argtypes = lib.repack_gguf.argtypes
    lib.gguf_x16_rows.restype = ctypes.c_int
    lib.gguf_x16_rows.argtypes = ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    lib.vnni_peak_ops.restype = ctypes.c_double
    lib.vnni_peak_ops.argtypes = [ctypes.c_int64]
    lib.dequant_pack_gguf.restype = ctypes.c_int
    lib.dequant_pack_gguf.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.pack_int8.restype = ctypes.c_int
    lib.pack_int8.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    lib.linear_int8.restype = ctypes.c_int
    lib.linear_int8.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3
                                + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_int, ctypes.c_void_p])
    # routed experts in one call (moe.c; called from sluice/layers/fused_moe.py)
    lib.moe_experts_bf16.restype = ctypes.c_int
    lib.moe_experts_bf16.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
                                     + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_int64] + [ctypes.c_void_p] * 2)
    # every adapter's LoRA delta of a step in one call (lora.c; called from sluice/lora/layers.py)
    lib.lora_bf16.restype = ctypes.c_int
    lib.lora_bf16.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
                              + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int])
    lib.moe_experts_gguf.restype = ctypes.c_int
    lib.moe_experts_gguf.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
                                     + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 2)
    return lib


@functools.cache
def _bf16_library(device: torch.device) -> ctypes.CDLL | None:
    """The library where the platform of `device` lets its vectorised bf16 kernels run (CPU flags,
    SLUICE_DISABLE_NATIVE, a built library), decided once per device."""
    return load_library() if current_platform(device).native_kernels(torch.bfloat16) else None


def _bf16_kernels(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library when its bf16 kernels can take these tensors (bf16, one device), else None;
    every element-wise kernel below asks it here, nowhere else. Called per layer per step: kept cheap."""
    device = tensors[0].device
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device != device:
            return None
    return _bf16_library(device)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up [T, 2I] in bf16, one pass; None when the caller must."""
    if not gate_up.is_contiguous() or (lib := _bf16_kernels(gate_up)) is None:
        return None
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, cols)
    status = lib.silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), rows, cols, torch.get_num_threads())
    return out if status == 0 else None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, heads, D] rotated by cos/sin [T, 1, D] (bf16), one pass; None when the caller must."""
    if (lib := _bf16_kernels(x, cos, sin)) is None:
        return None
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    status = lib.rotary_bf16(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                             x.shape[0], x.shape[1], x.shape[2], torch.get_num_threads())
    return out if status == 0 else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """bf16(bf16(x * rsqrt(mean(x^2) + eps)) * weight) over the last dim in one pass; None when the caller must."""
    if not x.is_contiguous() or (lib := _bf16_kernels(x, weight)) is None:
        return None
    out = torch.empty_like(x)
    status = lib.rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                               x.shape[-1], eps)
    return out if status == 0 else None


def argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """Row-wise argmax of bf16 logits [B, V] as torch.argmax gives it (the first maximum, a NaN
    counting as the maximum); None when the caller must."""
    if logits.dim() != 2 or logits.stride(-1) != 1 or (lib := _bf16_kernels(logits)) is None:
        return None
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if lib.argmax_bf16(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr()) != 0:
        return None
    return out


def lora(x: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, lora_a: torch.Tensor, lora_b_t: torch.Tensor,
         out: torch.Tensor, silu_mul: bool = False) -> torch.Tensor | None:
    """out[m] += (x[m] @ A[s]^T) @ B^T[s] for s = slots[m] (int32, -1: none) in place, A [S, W, K] and
    B^T [S, W, N]; silu_mul: out holds gate/up panels and silu(gate) * up comes back. None when
    the caller must (not bf16, no kernel)."""
    if x.dim() != 2 or x.stride(-1) != 1 or out.stride(-1) != 1 or (lib := _bf16_kernels(x, lora_a, out)) is None:
        return None
    rows, width = x.shape[0], lora_a.shape[1]
    act = out.new_empty(rows, out.shape[1] // 2) if silu_mul else out
    status = lib.lora_bf16(x.data_ptr(), rows, x.shape[1], x.stride(0), slots.data_ptr(), ranks.data_ptr(),
                           lora_a.data_ptr(), lora_b_t.data_ptr(), width, out.shape[1], out.data_ptr(), out.stride(0),
                           act.data_ptr(), act.stride(0), int(silu_mul))
    return act if status == 0 else None


def pack_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] -> the panel layout linear_bf16 reads; None when the kernel can't serve it."""
    if weight.shape[1] % 2 or (lib := _bf16_kernels(weight)) is None:
        return None
    weight = weight.contiguous()
    n, k = weight.shape
    packed = weight.new_empty(-(-n // PANEL) * PANEL * k)
    return packed if lib.pack_linear_bf16(weight.data_ptr(), packed.data_ptr(), n, k) == 0 else None


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, epilogue: int = EPI_STORE) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) with W packed by pack_linear; EPI_RESIDUAL adds `residual` after
    rounding, EPI_SILU_MUL returns silu(gate) * up of interleaved gate/up panels."""
    lib = load_library()
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if x.stride(-1) != 1 or x.stride(0) % 2:
        x = x.contiguous()
    width = out_features // 2 if epilogue == EPI_SILU_MUL else out_features
    out = x.new_empty(x.shape[0], width)
    res_ptr, res_stride = None, 0
    if epilogue == EPI_RESIDUAL:
        residual = residual.reshape(-1, out_features)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        res_ptr, res_stride = residual.data_ptr(), residual.stride(0)
    status = lib.linear_bf16(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), packed.data_ptr(), out_features,
                             None if bias is None else bias.data_ptr(), res_ptr, res_stride,
                             out.data_ptr(), width, epilogue)
    if status != 0:
        raise RuntimeError(f"linear_bf16 rejected shape {tuple(shape)} x {out_features} (epilogue {epilogue})")
    return out.view(*shape[:-1], width)


def rope_qkv_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """From qkv [T, (H + 2 Hkv) * D]: rotated q [T, H, D], with rotated k and v already stored in
    the cache at their slots. None when the caller must do it step by step."""
    if head_dim % 32 or qkv.stride(-1) != 1 or (lib := _bf16_kernels(qkv, kv_cache)) is None:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    T = qkv.shape[0]
    q = qkv.new_empty(T, num_heads, head_dim)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    status = lib.rope_qkv_cache_bf16(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                                     k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), T, num_heads,
                                     num_kv_heads, head_dim, k_cache.shape[1])
    return q if status == 0 else None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """Store k/v [T, Hkv, D] at their slots in the paired layouts; False when the caller must."""
    lib = load_library()
    if lib is None or k.device.type != "cpu" or k.dtype != k_cache.dtype or k.dtype not in (torch.bfloat16, torch.float32):
        return False
    k, v, slot_mapping = k.contiguous(), v.contiguous(), slot_mapping.to(torch.int64).contiguous()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    lib.write_kv(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(), slot_mapping.data_ptr(),
                 k.shape[0], num_kv_heads, head_dim, block_size, k.element_size())
    return True


def paged_attention_kv8(q: torch.Tensor, kv_cache: torch.Tensor, kv_kind: int, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                        soft_cap: float | None = None) -> torch.Tensor | None:
    """paged_attention over a compact cache [2, num_blocks, block_size, Hkv, D + 2] uint8 (see
    sluice/quantization/kv_cache.py) of kind kv_kind (attention.c's KV_INT8 / KV_FP8)."""
    lib = load_library()
    if lib is None or q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32):
        return None
    if kv_cache.dtype != torch.uint8 or not (q.is_contiguous() and kv_cache.is_contiguous()):
        return None
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    block_table = block_table.contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = lib.paged_attention_kv8(
        q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_table.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_table.shape[1],
        sliding_window or 0, scale, soft_cap or 0.0, int(q.dtype == torch.bfloat16), kv_kind, torch.get_num_threads(),
    )
    return out if status == 0 else None


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None) -> torch.Tensor | None:
    """q [B, H, D] -> [B, H, D], attending each row to its sequence's first seq_lens[b] cached keys
    (a decode row, or one row of a prompt), the last sliding_window of them where set, scores
    soft-capped where set. None when the kernel can't serve this call (no library, non-CPU
    tensors, odd dtype or sizes)."""
    lib = load_library()
    if lib is None or q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float32):
        return None
    if k_cache.dtype != q.dtype or not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    block_table = block_table.contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    status = lib.paged_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_table.shape[1],
        sliding_window or 0, scale, soft_cap or 0.0, int(q.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    return out if status == 0 else None
