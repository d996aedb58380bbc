"""Multi-LoRA serving: PEFT adapters applied on top of the base linear layers, many per step."""

from sluice.lora.request import LoRARequest

__all__ = ["LoRARequest"]
