"""Shared fixtures: the default model's files and tiny random-weight models of each family.

Models are built or loaded once per test session; tiny ones stay tiny (2 layers, hidden 64).
"""

from __future__ import annotations

import pytest

from sluice.loader import resolve_model

from tests.utils import model_folder_factory, random_model, tiny_config


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    return resolve_model(None).path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch -> folder with config.json, model.safetensors and tokenizer files."""
    return model_folder_factory(tmp_path_factory, lambda arch: random_model(tiny_config(arch)), "tiny")
