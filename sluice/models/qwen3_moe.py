"""Qwen3-MoE is Qwen3 (per-head q/k RMSNorm) with routed experts in its sparse layers (the same
layer rule as Qwen2-MoE), no shared expert; norm_topk_prob says whether the top-k weights are
renormalized."""

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from sluice.layers.fused_moe import FusedMoE, expert_checkpoint_names, stack_expert_weights
from sluice.models.llama import DecoderOptions, LlamaMLP
from sluice.models.qwen2_moe import is_sparse_layer
from sluice.models.qwen3 import Qwen3ForCausalLM


def qwen3_moe_mlp(config, layer_idx: int) -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return LlamaMLP(config, DecoderOptions())
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
                    renormalize=config.norm_topk_prob, activation=config.hidden_act)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), make_mlp=qwen3_moe_mlp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(weights, self.config.num_experts))

    def checkpoint_names(self) -> list[str]:
        return expert_checkpoint_names(super().checkpoint_names())
