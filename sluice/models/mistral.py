"""Mistral is Llama with a sliding attention window (v0.1; later versions set it to
null). The window is not implemented: see LlamaForCausalLM.sliding_window."""

from sluice.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
