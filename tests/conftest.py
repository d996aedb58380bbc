"""Shared fixtures: the default model's files and tiny random-weight models of each family.

Models are built or loaded once per test session; tiny ones stay tiny (2 layers, hidden 64).
"""

from __future__ import annotations

import pytest
import torch

from sluice.loader import resolve_model

from tests.utils import smollm2_tokenizer, tiny_config


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    return resolve_model(None).path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch -> folder with config.json, model.safetensors and tokenizer files."""
    cache: dict[str, str] = {}

    def build(arch: str) -> str:
        if arch not in cache:
            import transformers

            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
            model.save_pretrained(folder)
            smollm2_tokenizer().save_pretrained(folder)
            cache[arch] = str(folder)
        return cache[arch]

    return build
