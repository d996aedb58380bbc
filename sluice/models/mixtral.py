"""Mixtral is Mistral with every MLP replaced by experts (8 in 8x7B), two chosen per token by a
softmax router and renormalized to sum to one. Checkpoints call the block `block_sparse_moe` and
the experts' projections w1 (gate), w3 (up) and w2 (down)."""

import dataclasses
from collections.abc import Iterable

import torch

from sluice.layers.fused_moe import FusedMoE, expert_checkpoint_names, stack_expert_weights
from sluice.models.llama import DecoderOptions
from sluice.models.mistral import MistralForCausalLM


def mixtral_moe(config, layer_idx: int) -> FusedMoE:
    return FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                    config.intermediate_size, renormalize=True, activation=config.hidden_act)


class MixtralForCausalLM(MistralForCausalLM):

    @classmethod
    def decoder_options(cls, config) -> DecoderOptions:
        return dataclasses.replace(super().decoder_options(config), make_mlp=mixtral_moe)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights)
        super().load_weights(stack_expert_weights(renamed, self.config.num_local_experts))

    def checkpoint_names(self) -> list[str]:
        return expert_checkpoint_names(super().checkpoint_names())
