"""Qwen3 is Llama with a per-head RMSNorm on q and k (over head_dim, before rotary)
and no q/k/v bias. Its head_dim is independent of hidden_size / num_heads. Its windows
follow Qwen2's rule."""

from sluice.models.llama import DecoderOptions, LlamaForCausalLM, windows_by_layer_type


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_bias=bias, qk_norm="head")

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return windows_by_layer_type(config)
