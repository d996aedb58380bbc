"""Tiny random models and PEFT adapters with random weights (init_lora_weights=False), built once
per session."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_model_forward import CONFIGS
from tests.utils import random_model, smollm2_tokenizer, tiny_config

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3's checkpoints (and so PEFT on them) hold q/k/v and gate/up fused
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# (rank, lora_alpha, use_rslora) of the adapters each model gets
ADAPTERS = {"a": (8, 16, False), "b": (16, 8, True), "c": (4, 4, False)}


def model_config(arch: str):
    if arch in ("gemma2", "phi3"):
        config = CONFIGS[arch]()
        config.initializer_range = 0.3
        return config
    return tiny_config(arch)


def make_adapter(base, targets: list[str], rank: int, alpha: int, rslora: bool, seed: int, folder) -> None:
    """A PEFT LoRA on every target module with random A and B, saved as PEFT saves it."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                             init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # PEFT's random B is small; make the adapter change the tokens for sure
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4)
    model.save_pretrained(folder)
    model.unload()  # takes the LoRA layers out of `base` again


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory):
    """arch -> (model folder, {adapter name: folder}); built on first use."""
    cache: dict[str, tuple[str, dict[str, str]]] = {}

    def build(arch: str) -> tuple[str, dict[str, str]]:
        if arch not in cache:
            base = random_model(model_config(arch)).eval()
            folder = tmp_path_factory.mktemp(f"lora-{arch}")
            base.save_pretrained(folder)
            smollm2_tokenizer().save_pretrained(folder)
            targets = PHI3_TARGETS if arch == "phi3" else LLAMA_TARGETS
            adapters = {}
            for seed, (name, (rank, alpha, rslora)) in enumerate(ADAPTERS.items()):
                adapters[name] = str(tmp_path_factory.mktemp(f"lora-{arch}-{name}"))
                make_adapter(base, targets, rank, alpha, rslora, seed, adapters[name])
            cache[arch] = (str(folder), adapters)
        return cache[arch]

    return build
