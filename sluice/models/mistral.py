"""Mistral is Llama without biases, with a sliding attention window on every layer (v0.1: 4096
tokens; later versions set it to null)."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM, window_on_every_layer


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return DecoderOptions()  # transformers' Mistral reads neither attention_bias nor mlp_bias

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return window_on_every_layer(config)
