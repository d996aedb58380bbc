"""Read the weights of a Hugging Face checkpoint folder (*.safetensors)."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from sluice.loader import ModelLoadError

_INDEX = "model.safetensors.index.json"


def weight_files(folder: str) -> list[str]:
    """The checkpoint's shard files.

    When an index exists only the files it lists count: some repos (Mistral) also
    carry a `consolidated.safetensors` with the same weights under other names.
    """
    index_path = os.path.join(folder, _INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ModelLoadError(f"{index_path}: lists files that are missing: {', '.join(missing)}")
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"model folder '{folder}' has no *.safetensors weight files")
    return [os.path.join(folder, f) for f in files]


def _tensor_names(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from e


def iter_safetensors_weights(folder: str, dtype: torch.dtype,
                             keep_stored: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of every shard as (name, tensor in `dtype`, or as stored for the names in
    keep_stored: an int8 checkpoint's weights and scales); names are already HF names."""
    files = weight_files(folder)
    names = {path: _tensor_names(path) for path in files}  # headers only: cheap, and gives the bar a total
    total = sum(len(n) for n in names.values())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=None, leave=False) as bar:
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in names[path]:
                        tensor = f.get_tensor(name)
                        yield name, tensor if name in keep_stored else tensor.to(dtype)
                        bar.update()
            except Exception as e:
                raise ModelLoadError(f"{path}: could not read tensor data ({e})") from e
