"""Qwen2 is Llama with a bias on the q/k/v projections (but not on o_proj)."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)
