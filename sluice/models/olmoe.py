"""OLMoE is Llama with routed experts in every layer (softmax top-k, renormalized only when
norm_topk_prob) and an RMSNorm over all of q's heads at once and all of k's (not per head, as
Qwen3's; as OLMo2's). clip_qkv (clamping q, k and v) is refused: released OLMoE configs leave it null."""

import dataclasses
from collections.abc import Iterable

import torch

from sluice.layers.fused_moe import FusedMoE, expert_checkpoint_names, stack_expert_weights
from sluice.models.llama import DecoderOptions, LlamaForCausalLM, refuse_unsupported


def olmoe_moe(config, layer_idx: int) -> FusedMoE:
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size, config.intermediate_size,
                    renormalize=config.norm_topk_prob, activation=config.hidden_act)


class OlmoeForCausalLM(LlamaForCausalLM):

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), qk_norm="full", make_mlp=olmoe_moe)

    @classmethod
    def check_config(cls, config) -> None:
        refuse_unsupported(config, "OLMoE", "clip_qkv", (None,))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(weights, self.config.num_experts))

    def checkpoint_names(self) -> list[str]:
        return expert_checkpoint_names(super().checkpoint_names())
