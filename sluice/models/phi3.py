"""Phi-3 is Llama without biases whose checkpoint already fuses q/k/v into `qkv_proj` and
gate/up into `gate_up_proj` (load_weights copies them whole), with LongRoPE ("su") scaling on
the 128k-context variants (see sluice/layers/rotary.py) and, on some, a sliding window on every
layer."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM, window_on_every_layer


class Phi3ForCausalLM(LlamaForCausalLM):
    checkpoint_fuses_projections = True
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return DecoderOptions()

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return window_on_every_layer(config)
