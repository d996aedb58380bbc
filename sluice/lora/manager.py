"""The worker's adapters: which are loaded (an LRU of `max_cpu_loras`), which sit in the
`max_loras` slots of every hooked layer, and which rows of the step use which slot.

Adapters are checked against the model when added (`add_lora`), so a bad one is refused
before any request uses it; a step then only moves known-good weights into slots.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from sluice.config import LoRAConfig
from sluice.distributed import get_pp_group, get_tp_group
from sluice.distributed.sharding import ShardPlan
from sluice.layers.linear import GateUpLinear, Linear, MergedLinear
from sluice.lora.adapter import TARGET_MODULES, LoRAError, LoRAModel, LoRAWeights, load_adapter
from sluice.lora.layers import LoRALayer, LoRAStep
from sluice.lora.request import LoRARequest

logger = logging.getLogger("sluice")


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.step = LoRAStep(config.max_loras, dtype, device)
        tp = get_tp_group()
        self.shard_plan = ShardPlan.of(model, tp) if tp.world_size > 1 else None  # adapters split as the layers
        self.num_layers = model.config.get_text_config().num_hidden_layers  # split into pipeline stages
        # checkpoint module path (as PEFT names it) -> (its LoRA layer, shard index, in, out rows)
        self.targets: dict[str, tuple[LoRALayer, int, int, int]] = {}
        self.layers: list[tuple[LoRALayer, list[str]]] = []  # each layer and its shards' module paths
        for prefix, module in model.named_modules():
            if isinstance(module, Linear):
                self._hook(prefix, module, device)
        self.requests: dict[int, LoRARequest] = {}  # added adapters, by id
        self.loaded: OrderedDict[int, LoRAModel] = OrderedDict()  # least recently used first
        self.slots: list[int | None] = [None] * config.max_loras  # adapter id per slot
        self.slot_use: list[int] = [0] * config.max_loras  # step of last use, for eviction
        self.num_steps = 0

    def _hook(self, prefix: str, module: Linear, device: torch.device) -> None:
        """Give a decoder-layer projection its LoRA slots (the lm_head and others get none)."""
        names = [name.removesuffix(".weight") for name in module.checkpoint_names(prefix)]
        if prefix.rpartition(".")[2] not in TARGET_MODULES or ".layers." not in f".{prefix}":
            return
        if isinstance(module, MergedLinear) and len(names) == len(module.shard_sizes):
            shards = [(module.shard_offsets[s], size) for s, size in module.shard_sizes.items()]
            names = names + [prefix]  # a checkpoint that stores the projection fused targets it whole
            shards = shards + [(0, module.out_features)]
        else:
            names, shards = [prefix], [(0, module.out_features)]
        width = max(1, len(shards) - 1) * self.config.max_lora_rank  # the shards, or the whole fused
        layer = LoRALayer(shards, width, module.in_features, module.out_features, self.config.max_loras,
                          self.dtype, device, self.step,
                          panel_order=isinstance(module, GateUpLinear) and module.packed is not None)
        module.lora = layer
        self.layers.append((layer, names))
        for index, (name, (_, size)) in enumerate(zip(names, shards)):
            self.targets[name] = (layer, index, module.in_features, size)

    # ---- adapters -------------------------------------------------------------------
    def add_lora(self, request: LoRARequest) -> bool:
        """Load and check an adapter (a LoRAError names what is wrong); False if already added."""
        known = self.requests.get(request.lora_int_id)
        if known is not None:
            if known.lora_path != request.lora_path:
                raise LoRAError(f"lora_int_id {request.lora_int_id} is already {known.lora_name!r} at "
                                f"{known.lora_path!r}")
            return False
        self._load(request)
        self.requests[request.lora_int_id] = request
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; its slot frees (a request still using it reloads it from its path)."""
        self.loaded.pop(lora_int_id, None)
        for slot, held in enumerate(self.slots):
            if held == lora_int_id:
                self.slots[slot] = None
        return self.requests.pop(lora_int_id, None) is not None

    def list_loras(self) -> list[int]:
        return sorted(self.requests)

    def _load(self, request: LoRARequest) -> LoRAModel:
        """The adapter from the CPU cache, else from disk (checked against the model)."""
        adapter = self.loaded.get(request.lora_int_id)
        if adapter is None:
            adapter = load_adapter(request.lora_path, request.lora_int_id, self.config.max_lora_rank, self.dtype)
            if get_pp_group().num_stages > 1:
                adapter = self._stage_share(adapter)
            if self.shard_plan is not None:
                adapter = self._shard(request, adapter)
            self._check(request, adapter)
            self.loaded[request.lora_int_id] = adapter
            while len(self.loaded) > self.config.cpu_loras:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(request.lora_int_id)
        return adapter

    def _stage_share(self, adapter: LoRAModel) -> LoRAModel:
        """The modules of this pipeline stage's layers (and any a stage cannot place, for `_check`
        to refuse on every stage): the other stages' layers are theirs to check and hold."""
        pp = get_pp_group()
        modules = {name: w for name, w in adapter.modules.items() if pp.holds(name, self.num_layers)}
        return LoRAModel(adapter.adapter_id, adapter.rank, modules)

    def _shard(self, request: LoRARequest, adapter: LoRAModel) -> LoRAModel:
        """This tensor-parallel rank's share of an adapter (`_check` then compares it with this
        rank's layers: a wrong shape stays wrong in its share)."""
        modules = {}
        for name, w in adapter.modules.items():
            try:
                modules[name] = LoRAWeights(*self.shard_plan.shard_lora(name, w.lora_a, w.lora_b))
            except RuntimeError:
                raise LoRAError(f"lora_path {request.lora_path!r}: module {name!r} has lora_B "
                                f"{tuple(w.lora_b.shape)}, which does not split into this model's fused "
                                "projection") from None
        return LoRAModel(adapter.adapter_id, adapter.rank, modules)

    def _check(self, request: LoRARequest, adapter: LoRAModel) -> None:
        used: dict[int, int] = {}  # columns each layer's slot needs
        for name, weights in adapter.modules.items():
            target = self.targets.get(name)
            if target is None:
                raise LoRAError(f"lora_path {request.lora_path!r}: target module {name!r} is not a projection "
                                "of this model that takes a LoRA")
            _, _, in_features, out_features = target
            if weights.lora_a.shape[1] != in_features or weights.lora_b.shape[0] != out_features:
                share = "" if self.shard_plan is None else f" (this rank's share of {self.shard_plan.size})"
                raise LoRAError(f"lora_path {request.lora_path!r}: module {name!r} has lora_A "
                                f"{tuple(weights.lora_a.shape)} and lora_B {tuple(weights.lora_b.shape)}{share}; "
                                f"this model needs [r, {in_features}] and [{out_features}, r]")
            layer = target[0]
            used[id(layer)] = used.get(id(layer), 0) + weights.rank
            if used[id(layer)] > layer.width:
                raise LoRAError(f"lora_path {request.lora_path!r}: module {name!r} and the other shards of its "
                                "fused projection need more LoRA columns than max_lora_rank allows per shard "
                                "(an adapter targets a fused projection whole or its parts, not both)")

    # ---- one step -------------------------------------------------------------------
    def prepare_step(self, row_requests: list[LoRARequest | None]) -> dict[int, str]:
        """Give each of the step's rows its adapter's slot (one entry per row; None: the base
        model), moving adapters into slots as needed. The scheduler keeps the adapters of a step
        <= max_loras. Returns the adapters that could not be loaded (evicted from the CPU cache and
        their files gone since): id -> why; their rows run as the base model, for the caller to fail."""
        self.num_steps += 1
        ids = {r.lora_int_id: r for r in row_requests if r is not None}
        slot_of: dict[int, int] = {}
        failed: dict[int, str] = {}
        for adapter_id, request in ids.items():
            try:
                slot_of[adapter_id] = self._slot(request, ids)
            except LoRAError as exc:
                logger.error("LoRA adapter %s (id %d) could not be loaded: %s", request.lora_name, adapter_id, exc)
                failed[adapter_id] = f"LoRA adapter {request.lora_name!r} could not be loaded: {exc}"
                slot_of[adapter_id] = -1
        rows = [-1 if r is None else slot_of[r.lora_int_id] for r in row_requests]
        self.step.set(rows if any(slot >= 0 for slot in rows) else None)
        return failed

    def _slot(self, request: LoRARequest, step_ids: dict[int, LoRARequest]) -> int:
        """The adapter's slot, loading it into the least recently used slot no row of this step needs."""
        adapter_id = request.lora_int_id
        if adapter_id in self.slots:
            slot = self.slots.index(adapter_id)
        else:
            free = [s for s, held in enumerate(self.slots) if held not in step_ids]
            if not free:
                raise RuntimeError(f"more adapters in one step than max_loras={self.config.max_loras}")
            slot = min(free, key=self.slot_use.__getitem__)
            self._fill(slot, self._load(self.requests.get(adapter_id, request)))
            self.slots[slot] = adapter_id
        self.slot_use[slot] = self.num_steps
        return slot

    def _fill(self, slot: int, adapter: LoRAModel) -> None:
        for layer, names in self.layers:
            weights: list[LoRAWeights | None] = [adapter.modules.get(name) for name in names]
            layer.set_slot(slot, weights)
