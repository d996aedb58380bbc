"""Mistral is Llama without biases, with a sliding attention window (v0.1; later versions set
it to null). The window is not implemented: see LlamaForCausalLM.sliding_window."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return DecoderOptions()  # transformers' Mistral reads neither attention_bias nor mlp_bias
