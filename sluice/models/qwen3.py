"""Qwen3 is Llama with a per-head RMSNorm on q and k (over head_dim, before rotary)
and no q/k/v bias. Its head_dim is independent of hidden_size / num_heads."""

from sluice.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "qk_norm": True}
