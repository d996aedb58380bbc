"""Qwen2 is Llama with a bias on the q/k/v projections (but not on o_proj), and, with
use_sliding_window, a window on the layers its config marks "sliding_attention"."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM, windows_by_layer_type


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return windows_by_layer_type(config)
