"""Qwen2 is Llama with a bias on the q/k/v projections (but not on o_proj), and, with
use_sliding_window, a window on the layers its config marks "sliding_attention"."""

from sluice.models.llama import LlamaForCausalLM, windows_by_layer_type


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, config) -> dict:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False}

    @classmethod
    def sliding_windows(cls, config) -> list[int | None]:
        return windows_by_layer_type(config)
