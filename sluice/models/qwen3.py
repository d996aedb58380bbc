"""Qwen3 is Llama with a per-head RMSNorm on q and k (over head_dim, before rotary)
and no q/k/v bias. Its head_dim is independent of hidden_size / num_heads. Its windows
follow Qwen2's rule."""

from sluice.models.llama import LlamaForCausalLM, windows_by_layer_type


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "qk_norm": True}

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return windows_by_layer_type(config)
