"""Quantized weights behind one seam: `get_quantization_config` decides once at load which method
the model runs (sluice.config's `quantization`, the checkpoint's own quantization_config), and
sluice.layers.linear.set_linear_methods gives each linear layer its LinearMethod.

Methods: gguf (gguf.py: a GGUF file's blocks as stored; `auto` for a GGUF where its kernel runs),
int8 (int8.py: int8 blocks quantized at load), compressed-tensors (int8.py: an int8 checkpoint as
stored; `auto` for such a checkpoint), none (dense weights). Every method runs on split models:
pipeline stages hold their layers' weights as one rank would, tensor-parallel ranks their rows
and whole blocks of their inputs (a method refuses a share that cuts its blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.loader import ModelLoadError, ModelSource
from sluice.quantization.base import LinearMethod, QuantizationConfig

__all__ = ["LinearMethod", "QuantizationConfig", "Unquantized", "get_quantization_config"]

CHECKPOINT_METHODS = ("compressed-tensors",)  # quantization_config.quant_method values sluice runs


class Unquantized(QuantizationConfig):
    """Dense weights: a GGUF file dequantized at load (`--quantization none`), or a float checkpoint."""

    name = "none"

    def get_linear_method(self, layer: nn.Module, checkpoint_names: list[str]) -> LinearMethod | None:
        return None


def declared_quantization(hf_config) -> dict | None:
    """The quantization a Hugging Face checkpoint declares (config.json's quantization_config)."""
    declared = getattr(hf_config, "quantization_config", None)
    if declared is None or isinstance(declared, dict):
        return declared
    return declared.to_dict() if hasattr(declared, "to_dict") else vars(declared)


def gguf_blocks_run_here(device: torch.device) -> bool:
    """Whether `auto` runs a GGUF on its blocks: where quant.c's integer kernel runs (a CPU with
    AVX-512 VNNI); there it beats the dequantized bf16 path for one stream and at batch (README,
    Quantization). Elsewhere the file is dequantized at load."""
    if device.type != "cpu":
        return False
    from sluice.quantization.gguf import kernel_available

    return kernel_available()


def get_quantization_config(method: str, source: ModelSource, hf_config,
                            device: torch.device = torch.device("cpu")) -> QuantizationConfig:
    """The method the model runs: `method` as the user gave it (auto: the checkpoint's own; a GGUF's
    blocks where they run here; else none), checked against what the checkpoint holds."""
    declared = declared_quantization(hf_config) if source.kind == "hf_folder" else None
    if declared is not None:
        return _checkpoint_config(method, declared, source)
    if method == "auto":
        method = "gguf" if source.kind == "gguf" and gguf_blocks_run_here(device) else "none"
    if method == "gguf":
        if source.kind != "gguf":
            raise ModelLoadError(f"quantization='gguf' (--quantization) needs a .gguf model; "
                                 f"'{source.name}' is a safetensors checkpoint")
        from sluice.quantization.gguf import GGUFConfig

        return GGUFConfig(source.path, hf_config)
    if method == "int8":
        from sluice.pooling.config import is_encoder_only
        from sluice.quantization.int8 import Int8Config

        return Int8Config(per_channel=is_encoder_only(hf_config))
    if method == "compressed-tensors":
        raise ModelLoadError(f"quantization='compressed-tensors' (--quantization): '{source.name}' declares no "
                             "quantization_config")
    return Unquantized()


def _checkpoint_config(method: str, declared: dict, source: ModelSource) -> QuantizationConfig:
    """The config of a checkpoint stored quantized: only its own method can read it."""
    found = str(declared.get("quant_method") or "unknown")
    if found not in CHECKPOINT_METHODS:
        raise ModelLoadError(
            f"{source.path}: the checkpoint is quantized with {found!r} (quantization_config.quant_method in "
            f"config.json), which sluice does not run; supported: {', '.join(CHECKPOINT_METHODS)} (int8), GGUF "
            "files, and float checkpoints (optionally quantized at load with --quantization int8)")
    if method not in ("auto", found):
        raise ModelLoadError(f"quantization={method!r} (--quantization), but '{source.name}' is stored quantized "
                             f"with {found!r}; pass 'auto' or {found!r}")
    from sluice.quantization.int8 import CompressedTensorsConfig

    return CompressedTensorsConfig(declared, source.path)
