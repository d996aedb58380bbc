"""Read GGUF (llama.cpp) weights under Hugging Face names.

Quantized tensors are dequantized with the `gguf` package, except those the quantization config
keeps as stored (uint8 rows of GGML blocks, sluice/quantization/gguf.py). llama.cpp's converter
reorders the rows of Q and K for llama-style models (its rotary layout pairs
adjacent dims, Hugging Face's pairs the two halves); that is undone here so the
model code sees exactly what a safetensors checkpoint would give.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from sluice.loader import ModelLoadError

# Architectures whose Q/K rows llama.cpp permuted at conversion time.
_PERMUTED_ARCHS = {"llama", "mistral"}
_SUPPORTED_ARCHS = _PERMUTED_ARCHS | {"qwen2", "qwen3"}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp's precomputed rope scaling factors: the HF config already carries them.
_SKIPPED = {"rope_freqs"}
_PASS_THROUGH = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}


def open_gguf(path: str) -> gguf.GGUFReader:
    """Parse the file's header, turning any parse failure into an error naming the file."""
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e


def gguf_architecture(reader: gguf.GGUFReader, path: str) -> str:
    field = reader.get_field("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF metadata field 'general.architecture' is missing")
    return str(field.contents())


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name for a GGUF tensor name; None for tensors with no HF counterpart."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _SKIPPED:
        return None
    if base in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[base]}.{suffix}"
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise KeyError(gguf_name)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(n_head, 2, rows//n_head//2, ...).swapaxes(1, 2)`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_numpy(tensor: gguf.ReaderTensor) -> np.ndarray:
    if tensor.tensor_type in _PASS_THROUGH:
        return tensor.data
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def _read_tensor(tensor: gguf.ReaderTensor, keep_blocks: bool) -> np.ndarray:
    """The tensor as stored (its GGML blocks, uint8 [rows, row bytes]) or dequantized."""
    return tensor.data if keep_blocks else _to_numpy(tensor)


def iter_gguf_weights(path: str, config, dtype: torch.dtype,
                      keep_blocks: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of a GGUF file as (HF name, dense tensor in `dtype`); those named in
    keep_blocks come as stored."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    if arch not in _SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture '{arch}' is not supported; supported: {', '.join(sorted(_SUPPORTED_ARCHS))}"
        )
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    qk_heads = {"attn_q": n_head, "attn_k": n_kv_head} if arch in _PERMUTED_ARCHS else {}

    desc = f"Loading {os.path.basename(path)}"
    for tensor in tqdm(reader.tensors, desc=desc, unit="tensor", disable=None, leave=False):
        try:
            name = hf_name(tensor.name)
        except KeyError:
            raise ModelLoadError(f"{path}: unexpected tensor '{tensor.name}' for architecture '{arch}'") from None
        if name is None:
            continue
        try:
            array = _read_tensor(tensor, name in keep_blocks)
        except Exception as e:
            raise ModelLoadError(
                f"{path}: could not dequantize tensor '{tensor.name}' ({tensor.tensor_type.name}): {e}"
            ) from e
        role = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None  # e.g. "attn_q"
        if role in qk_heads:
            array = unpermute_qk(array, qk_heads[role])
        if not array.flags.writeable:  # a view of the read-only memory map
            array = array.copy()
        weight = torch.from_numpy(np.ascontiguousarray(array))
        yield name, weight if name in keep_blocks else weight.to(dtype)
