"""Read GGUF (llama.cpp) weights under Hugging Face names.

Quantized tensors are dequantized with the `gguf` package, except those the quantization config
keeps as stored (uint8 rows of GGML blocks, sluice/quantization/gguf.py). Tensor names are translated with
the `gguf` package's own per-architecture name map (the one llama.cpp's converter writes
with), applied to the checkpoint names sluice's model of the architecture loads. What else the
converter changed is undone as the registry (sluice/models/registry.py) records it: Q/K row
order for llama-style rotary, norm weights stored with an offset (Gemma). The model code then
sees exactly what a safetensors checkpoint would give.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator

import gguf
import numpy as np
import torch
from tqdm import tqdm

from sluice.distributed import get_pp_group
from sluice.loader import ModelLoadError
from sluice.models.registry import (MODEL_REGISTRY, Architecture, get_architecture, get_model_class,
                                    gguf_architecture_name)

# llama.cpp's precomputed rope scaling factors: the HF config already carries them.
_SKIPPED = {"rope_freqs"}
_PASS_THROUGH = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


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


def supported_gguf_architectures() -> list[str]:
    return sorted({entry.gguf for entry in MODEL_REGISTRY.values() if entry.gguf})


def registry_entry(config, arch: str, path: str) -> Architecture:
    """The registry's entry for the config's architecture, checked against the file's."""
    name, entry = get_architecture(config)
    if entry.gguf != arch:
        raise ModelLoadError(
            f"{path}: GGUF architecture '{arch}' is not supported for {name}; "
            f"supported GGUF architectures: {', '.join(supported_gguf_architectures())}"
        )
    return entry


def hf_names(config, arch: str) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, for every tensor sluice's model of this config loads.

    The checkpoint names come from the model built on the meta device (no memory, no weights);
    the `gguf` package maps each to the name llama.cpp's converter writes."""
    with torch.device("meta"):
        model = get_model_class(config)(config)
    name_map = gguf.get_tensor_name_map(_ARCH_BY_NAME[arch], config.num_hidden_layers)
    names = {}
    for hf_name in model.checkpoint_names():
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            names[f"{gguf_base}.{suffix}"] = hf_name
    return names


def gguf_file_architecture(reader: gguf.GGUFReader, path: str) -> str:
    """The registry's architecture name for this file; the error lists the supported GGUF architectures."""
    arch = gguf_architecture(reader, path)
    name = gguf_architecture_name(arch, reader.get_field(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch)) is not None)
    if name is None:
        raise ModelLoadError(f"{path}: GGUF architecture '{arch}' is not supported; "
                             f"supported: {', '.join(supported_gguf_architectures())}")
    return name


# llama.cpp's metadata key ({arch} filled in) -> the transformers config field it holds. A key the
# file lacks leaves the config class's default; Granite's scales exist only in Granite files.
_CONFIG_FIELDS = {
    gguf.Keys.LLM.CONTEXT_LENGTH: "max_position_embeddings",
    gguf.Keys.LLM.BLOCK_COUNT: "num_hidden_layers",
    gguf.Keys.LLM.EMBEDDING_LENGTH: "hidden_size",
    gguf.Keys.LLM.FEED_FORWARD_LENGTH: "intermediate_size",
    gguf.Keys.LLM.VOCAB_SIZE: "vocab_size",
    gguf.Keys.Attention.HEAD_COUNT: "num_attention_heads",
    gguf.Keys.Attention.HEAD_COUNT_KV: "num_key_value_heads",
    gguf.Keys.Attention.KEY_LENGTH: "head_dim",
    gguf.Keys.Attention.LAYERNORM_RMS_EPS: "rms_norm_eps",
    gguf.Keys.Attention.SLIDING_WINDOW: "sliding_window",
    gguf.Keys.LLM.EXPERT_COUNT: "num_experts",  # Mixtral's num_local_experts via its attribute_map
    gguf.Keys.LLM.EXPERT_USED_COUNT: "num_experts_per_tok",
    gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: "moe_intermediate_size",
    gguf.Keys.LLM.EXPERT_WEIGHTS_NORM: "norm_topk_prob",
    gguf.Keys.LLM.EMBEDDING_SCALE: "embedding_multiplier",
    gguf.Keys.LLM.RESIDUAL_SCALE: "residual_multiplier",
    gguf.Keys.LLM.LOGIT_SCALE: "logits_scaling",
    gguf.Keys.Attention.SCALE: "attention_multiplier",
    gguf.Keys.Tokenizer.BOS_ID: "bos_token_id",
    gguf.Keys.Tokenizer.EOS_ID: "eos_token_id",
    gguf.Keys.Tokenizer.PAD_ID: "pad_token_id",
}


def config_from_metadata(path: str):
    """The transformers config of a GGUF whose architecture transformers reads no config for
    (the registry's gguf_own_config), built from llama.cpp's metadata keys."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    name = gguf_file_architecture(reader, path)
    scaling = reader.get_field(gguf.Keys.Rope.SCALING_TYPE.format(arch=arch))
    if scaling is not None and scaling.contents() != "none":
        raise ModelLoadError(f"{path}: GGUF metadata '{arch}.rope.scaling.type' = {scaling.contents()!r} is not "
                             f"supported for {name}; load the safetensors checkpoint instead")
    fields = {hf: reader.get_field(key.format(arch=arch)) for key, hf in _CONFIG_FIELDS.items()}
    values = {hf: field.contents() for hf, field in fields.items() if field is not None}
    values.setdefault("vocab_size", len(reader.get_field(gguf.Keys.Tokenizer.LIST).data))
    theta = reader.get_field(gguf.Keys.Rope.FREQ_BASE.format(arch=arch))
    if theta is not None:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": theta.contents()}
    # llama.cpp writes the output projection only when it is not the embedding matrix
    values["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    model_type = next(t for t, arch_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if arch_name == name)
    return transformers.AutoConfig.for_model(model_type, architectures=[name], **values)


# Expert sizes transformers' GGUF config reader leaves at its config class defaults.
_MOE_CONFIG_FIELDS = {"expert_feed_forward_length": "moe_intermediate_size",
                      "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


def complete_moe_config(path: str, config) -> None:
    """Set the expert sizes a GGUF's metadata holds but transformers' reader skips."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    for key, attr in _MOE_CONFIG_FIELDS.items():
        field = reader.get_field(f"{arch}.{key}")
        if field is not None:
            setattr(config, attr, int(field.contents()))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(n_head, 2, rows//n_head//2, ...).swapaxes(1, 2)`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_numpy(tensor: gguf.ReaderTensor) -> np.ndarray:
    if tensor.tensor_type in _PASS_THROUGH:
        return tensor.data
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def _undo_conversion(array: np.ndarray, gguf_name: str, entry: Architecture, config) -> np.ndarray:
    """Reverse what llama.cpp's converter did to this tensor beyond renaming it."""
    role = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else None  # e.g. "attn_q"
    if entry.gguf_permuted_qk and role in ("attn_q", "attn_k"):
        n_head = config.num_attention_heads
        if role == "attn_k":
            n_head = getattr(config, "num_key_value_heads", None) or n_head
        array = unpermute_qk(array, n_head)
    if role == "ffn_gate_inp_shexp" and array.ndim == 1:  # the shared expert's [1, hidden] gate, as a vector
        array = array[None]
    if entry.gguf_norm_offset and gguf_name.endswith("norm.weight"):
        array = array - np.asarray(entry.gguf_norm_offset, dtype=array.dtype)
    return array


def _read_tensor(tensor: gguf.ReaderTensor, keep_blocks: bool) -> np.ndarray:
    """The tensor as stored (its GGML blocks, uint8 [rows, row bytes]) or dequantized."""
    return tensor.data if keep_blocks else _to_numpy(tensor)


def iter_gguf_weights(path: str, config, dtype: torch.dtype,
                      keep_blocks: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every weight of a GGUF file as (HF name, dense tensor in `dtype`); those named in
    keep_blocks come as stored."""
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    entry = registry_entry(config, arch, path)
    names = hf_names(config, arch)  # of this pipeline stage's model: its layers, its ends
    one_stage = get_pp_group().num_stages == 1
    desc = f"Loading {os.path.basename(path)}"
    for tensor in tqdm(reader.tensors, desc=desc, unit="tensor", disable=None, leave=False):
        if tensor.name.rpartition(".")[0] in _SKIPPED:
            continue
        if tensor.name not in names:
            if not one_stage:
                continue  # another stage's (one stage loading the whole file checks every name)
            raise ModelLoadError(f"{path}: unexpected tensor '{tensor.name}' for architecture '{arch}'")
        name = names[tensor.name]
        try:
            array = _read_tensor(tensor, name in keep_blocks)
        except Exception as e:
            raise ModelLoadError(
                f"{path}: could not dequantize tensor '{tensor.name}' ({tensor.tensor_type.name}): {e}"
            ) from e
        array = _undo_conversion(array, tensor.name, entry, config)
        if not array.flags.writeable:  # a view of the read-only memory map
            array = array.copy()
        weight = torch.from_numpy(np.ascontiguousarray(array))
        yield name, weight if name in keep_blocks else weight.to(dtype)
