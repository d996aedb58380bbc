"""Phi-3 is Llama without biases whose checkpoint already fuses q/k/v into `qkv_proj` and
gate/up into `gate_up_proj` (load_weights copies them whole), with LongRoPE ("su") scaling on
the 128k-context variants (see sluice/layers/rotary.py) and a sliding window on some."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return DecoderOptions()
