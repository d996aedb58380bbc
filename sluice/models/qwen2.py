"""Qwen2 is Llama with a bias on the q/k/v projections (but not on o_proj)."""

from sluice.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, config) -> dict:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False}
