"""Mistral is Llama with a sliding attention window on every layer (v0.1: 4096 tokens; later
versions set it to null)."""

from sluice.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return [getattr(config, "sliding_window", None)] * config.num_hidden_layers
