"""Which slice of each checkpoint tensor a tensor-parallel rank holds, and which models can be split.

Column-parallel (q/k/v, gate/up: output rows split by heads or columns), row-parallel (o, down:
input columns split; the partial sums meet in an all-reduce, the bias is added once, on rank 0),
vocabulary-parallel (embedding and lm_head rows, padded to equal shares). KV heads are split
when there are at least as many as ranks, else each rank keeps the one its query heads read.
Every expert of a mixture-of-experts layer is split the same way as a dense MLP (1/N of its
intermediate dim on each rank; the router is replicated), and so is a shared expert; a q/k norm
over the whole projection (OLMo2, OLMoE) keeps its weights' share of the heads.
Tensors are sliced as they stream out of the checkpoint: a rank never keeps the full tensor.
A pipeline stage skips the other stages' decoder layers (every stage keeps the embedding,
final norm and lm_head, small next to the layers, so a tied lm_head needs nothing special).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from sluice.distributed import Communicator, PipelineStage

VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")
# an expert's tensor: one per expert (experts.3.w1.weight), or every expert's stacked (experts.gate_proj.weight
# [E, I, H], experts.gate_up_proj [E, 2I, H])
_EXPERT = re.compile(r".*\.experts\.(?:\d+\.)?(?P<proj>\w+?)(?:\.weight(?P<scale>_scale)?)?")
_COLUMN = ("gate_proj", "up_proj", "w1", "w3")
_ROW = ("o_proj", "down_proj", "w2")
# the feed-forward widths a family may have; each must divide into the ranks
_INTERMEDIATE_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
_FLAG = "tensor_parallel_size (--tensor-parallel-size, -tp)"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def local_heads(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(query heads, KV heads, first KV head) of one rank."""
    if num_kv_heads >= tp:
        per_rank = num_kv_heads // tp
        return num_heads // tp, per_rank, rank * per_rank
    return num_heads // tp, 1, rank * num_kv_heads // tp  # replicated: the head its query heads share


def check_parallel(hf_config, model_class: type, tp: int, pp: int) -> None:
    """Refuse, at start and naming the numbers, a model these ranks cannot split."""
    arch = model_class.__name__
    if pp > 1:
        flag = "pipeline_parallel_size (--pipeline-parallel-size, -pp)"
        if not getattr(model_class, "supports_pipeline_parallel", False):
            raise ValueError(f"{flag}={pp}: {arch} cannot run in pipeline stages (its layers are not split in "
                             f"sluice); use {flag}=1")
        if hf_config.num_hidden_layers < pp:
            raise ValueError(f"{flag}={pp} is more than the model's num_hidden_layers={hf_config.num_hidden_layers} "
                             f"({arch})")
    if tp == 1:
        return
    reason = getattr(model_class, "tensor_parallel_unsupported", "it has no tensor-parallel layers in sluice")
    if reason:
        raise ValueError(f"{_FLAG}={tp}: {arch} cannot run tensor-parallel ({reason}); use {_FLAG}=1")
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % tp:
        raise ValueError(f"{_FLAG}={tp} must divide the model's num_attention_heads={heads} ({arch})")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"{_FLAG}={tp} and the model's num_key_value_heads={kv_heads} ({arch}): one must "
                         "divide the other (KV heads are split, or replicated when fewer than ranks)")
    for field in _INTERMEDIATE_FIELDS:
        inter = getattr(hf_config, field, None) or 0
        if inter % tp:
            raise ValueError(f"{_FLAG}={tp} must divide the model's {field}={inter} ({arch})")


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int
    moe_intermediate: int = 0  # each routed expert's (Mixtral's and OLMoE's: intermediate)
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert's
    # (values, bytes) of one block of a tensor loaded as stored GGML blocks (None: dense)
    stored_block: Callable[[str], tuple[int, int] | None] = lambda name: None
    vocab_parallel: tuple[str, ...] = VOCAB_PARALLEL  # the model's weights split by vocabulary rows

    @classmethod
    def of(cls, model: torch.nn.Module, tp: Communicator,
           stored_block: Callable[[str], tuple[int, int] | None] | None = None) -> ShardPlan:
        config = model.config
        return cls(tp.rank, tp.world_size, model.head_dim, config.num_attention_heads,
                   config.num_key_value_heads, config.intermediate_size, config.vocab_size,
                   getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
                   getattr(config, "shared_expert_intermediate_size", None) or 0,
                   stored_block or (lambda name: None), getattr(model, "vocab_parallel_weights", VOCAB_PARALLEL))

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a Hugging Face-named checkpoint tensor (a copy; the rest is dropped)."""
        if name in self.vocab_parallel:
            return self._vocab_rows(tensor)
        expert = _EXPERT.fullmatch(name)
        if expert is not None:
            return self._expert(name, expert["proj"], tensor, scale=bool(expert["scale"]))
        prefix, _, leaf = name.rpartition(".")
        proj = prefix.rpartition(".")[2]
        q, kv = self._q_rows(), self._kv_rows()
        mlp = self._share(self.shared_intermediate if ".shared_expert." in name else self.intermediate)
        if proj == "q_proj" or (proj == "q_norm" and tensor.shape[0] == self.num_heads * self.head_dim):
            return _rows(tensor, q)  # a q_norm over the whole projection: this rank's heads' weights
        if proj in ("k_proj", "v_proj") or (proj == "k_norm" and tensor.shape[0] == self.num_kv_heads * self.head_dim):
            return _rows(tensor, kv)
        if proj in _COLUMN:
            return _rows(tensor, mlp)
        if proj in _ROW:
            if leaf == "weight_scale":  # int8 scales per output channel (compressed-tensors): not split
                return tensor
            if leaf != "weight":  # the bias: added once, after the all-reduce sums the ranks
                return tensor.clone() if self.rank == 0 else torch.zeros_like(tensor)
            return self._columns(name, tensor, q if proj == "o_proj" else mlp)
        if proj == "qkv_proj":  # a checkpoint that fuses them (Phi-3)
            D = self.head_dim
            parts = tensor.split([self.num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D])
            return torch.cat([_rows(parts[0], q), _rows(parts[1], kv), _rows(parts[2], kv)])
        if proj == "gate_up_proj":
            gate, up = tensor.chunk(2)
            return torch.cat([_rows(gate, mlp), _rows(up, mlp)])
        return tensor  # norms and everything else: replicated

    def shard_lora(self, module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA's A [r, in] and B [out, r] on a projection (checkpoint path `module`) as this rank
        holds that projection: on row-parallel ones (o, down) A's inputs are split, and the partial
        delta joins the base's all-reduce; on the others B's output rows are, as the weight's."""
        name = f"{module}.weight"
        if module.rpartition(".")[2] in _ROW:
            return self.shard(name, lora_a), lora_b
        return lora_a, self.shard(name, lora_b)

    def _columns(self, name: str, tensor: torch.Tensor, bounds: tuple[int, int]) -> torch.Tensor:
        """Input columns [start, end) of a weight; of GGML blocks as stored, the bytes of whole blocks."""
        start, end = bounds
        block = self.stored_block(name)
        if block is not None:
            values, nbytes = block
            if start % values or end % values:
                raise ValueError(f"{name}: {_FLAG}={self.size} splits its inputs into shares of {end - start}, "
                                 f"not whole quantized blocks of {values}; use fewer ranks or quantization 'none'")
            start, end = start // values * nbytes, end // values * nbytes
        return tensor[..., start:end].clone()

    def _q_rows(self) -> tuple[int, int]:
        per_rank = self.num_heads // self.size * self.head_dim
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def _kv_rows(self) -> tuple[int, int]:
        _, count, first = local_heads(self.num_heads, self.num_kv_heads, self.size, self.rank)
        return first * self.head_dim, (first + count) * self.head_dim

    def _share(self, width: int) -> tuple[int, int]:
        """[start, end) of this rank's 1/N of a feed-forward width."""
        per_rank = width // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def _expert(self, name: str, proj: str, tensor: torch.Tensor, scale: bool = False) -> torch.Tensor:
        """An expert projection, one expert's [out, in] or every expert's [E, out, in]: gate and up
        split by output rows, down by input columns (experts have no bias). Its int8 scales per
        output channel ([..., out, 1], `scale`) follow the rows, and stay whole on down."""
        start, end = self._share(self.moe_intermediate)
        if scale and proj in _ROW:
            return tensor
        if proj == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=-2)
            return torch.cat([gate[..., start:end, :], up[..., start:end, :]], dim=-2)
        if proj in _COLUMN:
            return tensor[..., start:end, :].clone()
        if proj in _ROW:
            return self._columns(name, tensor, (start, end))
        raise ValueError(f"expert tensor {proj!r}: not one this rank knows how to split")

    def _vocab_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        per_rank = cdiv(self.vocab, self.size)
        start = self.rank * per_rank
        part = tensor[start : min(start + per_rank, self.vocab)]
        padded = tensor.new_zeros((per_rank, *tensor.shape[1:]))
        padded[: part.shape[0]] = part
        return padded


def _rows(tensor: torch.Tensor, bounds: tuple[int, int]) -> torch.Tensor:
    return tensor[bounds[0] : bounds[1]].clone()


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], model: torch.nn.Module, tp: Communicator,
                  pp: PipelineStage, stored_block: Callable[[str], tuple[int, int] | None] | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as this rank holds them: its stage's layers (and the rest), each
    sliced to its tensor-parallel share (all of them on a single rank). stored_block: a tensor's
    block geometry when it arrives as stored GGML blocks (their rows are bytes)."""
    if tp.world_size == 1 and pp.num_stages == 1:
        yield from weights
        return
    plan = ShardPlan.of(model, tp, stored_block) if tp.world_size > 1 else None
    num_layers = model.config.num_hidden_layers
    for name, tensor in weights:
        if not pp.holds(name, num_layers):
            continue  # another stage's layer
        yield name, tensor if plan is None else plan.shard(name, tensor)
