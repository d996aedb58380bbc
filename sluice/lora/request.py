"""What names an adapter: vLLM's LoRARequest. Plain data that crosses to the engine core (msgspec
encodes dataclasses), so this module imports no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """lora_int_id: a positive id unique per adapter for the engine's life (it keys the slots and
    the prefix cache); lora_path: a PEFT folder (adapter_config.json, adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not self.lora_name or not isinstance(self.lora_name, str):
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not self.lora_path or not isinstance(self.lora_path, str):
            raise ValueError(f"lora_path must be a non-empty string, got {self.lora_path!r}")
