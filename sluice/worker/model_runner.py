"""Turns a SchedulerOutput into one varlen forward pass plus batched sampling.

The runner reads only plain data from the scheduler and keeps its own per-request state (an
InputBatch): it could run in another process, as one of several ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import math
import mmap
import os
import threading

import psutil
import torch

from sluice.config import EngineConfig
from sluice.core.kv_cache_manager import kv_cache_groups
from sluice.core.sched_output import GrammarBitmask, RunnerOutput, SchedulerOutput
from sluice.distributed import get_pp_group, get_tp_group
from sluice.distributed.sharding import check_parallel, shard_weights
from sluice.layers.attention import AttentionMetadata, attention_layers, build_attention_metadata
from sluice.layers.fused_moe import pack_experts, process_moe_weights_after_loading, set_moe_methods
from sluice.layers.linear import pack_linears, process_weights_after_loading, set_linear_methods
from sluice.layers.linear_path import prompt_dtype
from sluice.loader import ModelLoadError, ModelSource, iter_weights, load_hf_config, resolve_model
from sluice.models.decoder_stack import attach_decoder_stacks
from sluice.models.registry import EAGLE_HEADS, get_model_class
from sluice.pooling.config import complete_encoder_config, load_pooler_config, resolve_runner
from sluice.pooling.pooler import Chunk as PoolChunk
from sluice.pooling.pooler import Pooler
from sluice.lora.manager import LoRAManager
from sluice.platform import available_memory_bytes
from sluice.quantization import get_quantization_config
from sluice.spec_decode.draft_model import DraftModel
from sluice.spec_decode.eagle import EagleProposer, HeadBatch, aux_hidden_state_layers, check_draft_vocabulary
from sluice.spec_decode.ngram import NgramProposer
from sluice.worker.encoder_cache import EncoderCache
from sluice.worker.input_batch import CachedRequestState, InputBatch
from sluice.worker.rejection_sampler import RejectionSampler
from sluice.worker.sampler import RowBitmask, Sampler, SamplingMetadata, compute_prompt_logprobs

logger = logging.getLogger("sluice")

MAX_NUM_BLOCKS = 1 << 20  # block objects live in Python; beyond this the pool itself gets slow
DEFAULT_KV_CACHE_BYTES = 4 << 30  # without a size or a fraction: vLLM's CPU default of 4 GiB
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, leaving their contents alone


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def _zeroed_host_memory(num_bytes: int) -> torch.Tensor:
    """Anonymous memory: zero-filled by the OS page by page on first touch (so an unused cache
    costs nothing), on transparent huge pages where the kernel allows, which spares the TLB
    misses of reading blocks scattered over gigabytes."""
    buffer = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return torch.frombuffer(buffer, dtype=torch.uint8)


def _populate(kv_caches: list[torch.Tensor], stop: threading.Event, part: int = 0, parts: int = 1) -> None:
    """Fault the KV cache in, in the pool's order, one huge page per K/V region at a time
    (of every `parts` such steps, the `part`-th: threads share the work that way).

    The pool hands out never-used blocks first, in id order, and on first touch every page is
    zero-filled by the OS: on a VM that runs at 0.5-4 GB/s, so a fresh 256-token request (60 K/V
    regions) could stall 0.1-0.2 s inside its TTFT. MADV_POPULATE_WRITE faults the pages in
    without touching their contents, so it is safe beside the engine's own writes.
    """
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    regions = [half for cache in kv_caches for half in cache.unbind(0)]
    num_blocks = regions[0].shape[0]
    # plain ints: the loop below calls only C. Layers may differ in block size (a draft model's).
    bases = [(region.data_ptr(), region[0].numel() * region.element_size()) for region in regions]
    step = max(1, (2 << 20) // max(block_bytes for _, block_bytes in bases))
    for start in range(part * step, num_blocks, parts * step):
        count = min(num_blocks, start + step) - start
        for base, block_bytes in bases:
            address = base + start * block_bytes
            page_start = address & ~(mmap.PAGESIZE - 1)
            length = count * block_bytes + address - page_start
            if stop.is_set() or madvise(page_start, length, MADV_POPULATE_WRITE) != 0:
                return  # stopped, or a kernel before 5.14: pages fault in on first use


def _populate_when_idle(kv_caches: list[torch.Tensor], stop: threading.Event) -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # Linux: this thread only
    except (AttributeError, OSError):
        pass
    _populate(kv_caches, stop)


def _stop_thread(thread: threading.Thread, stop: threading.Event) -> None:
    stop.set()
    thread.join(timeout=5)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(hf_config, source: ModelSource, dtype: torch.dtype, device: torch.device,
               quantization: str, model_class: type[torch.nn.Module] | None = None,
               keep_stored: tuple[str, ...] = ()) -> tuple[torch.nn.Module, str]:
    """Build the registry's class for this config (or model_class), give every linear layer its
    quantization method, load the weights (those named in keep_stored in their stored dtype), and
    put the unquantized layers on the fastest linear path. Returns the model and the name of the
    quantization in use."""
    model_class = model_class or get_model_class(hf_config)
    tp, pp = get_tp_group(), get_pp_group()
    check_parallel(hf_config, model_class, tp.world_size, pp.num_stages)
    quant_config = get_quantization_config(quantization, source, hf_config, device)
    with _default_dtype(dtype), device:
        model = model_class(hf_config)
    quant_config.prepare_model(model)
    methods = set_linear_methods(model, quant_config) | set_moe_methods(model, quant_config)
    stored = quant_config.raw_weight_names()  # may match by pattern: extended only where there is more to keep
    weights = iter_weights(source, hf_config, dtype, {*stored, *keep_stored} if keep_stored else stored)
    model.load_weights(shard_weights(weights, model, tp, pp, quant_config.stored_block))
    process_weights_after_loading(model)
    process_moe_weights_after_loading(model)
    model.eval()
    quant_config.log_summary()
    logger.info("quantization %s; layers: %s", quant_config.name,
                ", ".join(f"{n} {label}" for label, n in methods.items()))
    pack_linears(model)  # a no-op where the native bf16 kernel can't run
    pack_experts(model)
    return model, quant_config.name


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource) -> None:
        self.config = config
        complete_encoder_config(config, hf_config)  # may settle an encoder's dtype "auto"
        self.dtype = config.model.torch_dtype
        self.device = torch.device(config.model.device)
        self.block_size = config.cache.block_size
        self.model, self.quantization = load_model(hf_config, source, self.dtype, self.device,
                                                   config.model.quantization)
        self.vocab_size = hf_config.get_text_config().vocab_size
        # a vision-language model: image features replace the placeholder tokens' embeddings
        self.encoder_cache = EncoderCache(self.model.embed_images, self.device) \
            if hasattr(self.model, "embed_images") else None
        if self.encoder_cache is not None:  # a vision tower only runs whole images, as an encoder does
            self.model.tower().to(prompt_dtype(config.model, *self.model.tower_ffn_shape()))
        self.uses_mrope = getattr(self.model, "uses_mrope", False)  # Qwen2-VL: positions [3, T]
        self.lora_manager = LoRAManager(self.model, config.lora, config.lora.torch_dtype(self.dtype), self.device) \
            if config.lora.enable_lora else None
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler(self.sampler)
        spec = config.speculative
        if self.encoder_cache is not None and spec.enabled and spec.method != "ngram":
            raise ValueError(f"speculative_config method {spec.method!r} is not available for a vision-language "
                             "model (its drafter would read image placeholders as text); use 'ngram'")
        self.ngram = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) \
            if spec.enabled and spec.method == "ngram" else None
        self.draft: DraftModel | EagleProposer | None = None
        if spec.enabled and spec.method == "draft_model":
            self.draft = self._load_draft(hf_config)
        elif spec.enabled and spec.method in EAGLE_HEADS:
            self.draft = self._load_eagle(hf_config)
        # every layer that holds KV, the draft's after the target's: a block id addresses all of them
        self.attention_layers = attention_layers(self.model) + (attention_layers(self.draft.model) if self.draft else [])
        self.num_target_layers = len(attention_layers(self.model))
        for attn in self.attention_layers:
            attn.set_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, self.device)
        self.kv_groups = kv_cache_groups([attn.params.sliding_window for attn in self.attention_layers],
                                         hybrid=self._layers_can_share_kv())
        for index, group in enumerate(self.kv_groups):
            for layer in group.layers:
                self.attention_layers[layer].kv_group = index
        self.kv_tensors: list[torch.Tensor] = []  # the cache tensors; kv_caches maps layers onto them
        self.input_batch = InputBatch()
        self.kv_caches: list[torch.Tensor] = []
        self.pooler = None  # runner="pooling": requests are pooled once their prompt has run
        if resolve_runner(config, hf_config) == "pooling":
            folder = source.path if source.kind == "hf_folder" else None
            self.pooler = Pooler(load_pooler_config(config, folder, hf_config), self.model)
        self.attach_decoder_stacks()

    def attach_decoder_stacks(self) -> None:
        """One native call per step for plain decoder stacks, now that LoRA, EAGLE's hooks and
        the KV cache dtype are in place (again whenever the weights move: sleep mode)."""
        attach_decoder_stacks(self.model)
        if isinstance(self.draft, DraftModel):
            attach_decoder_stacks(self.draft.model)

    def _load_draft(self, hf_config) -> DraftModel:
        """The draft model of speculative_config; its vocabulary must be the target's."""
        spec = self.config.speculative
        source = resolve_model(spec.model)
        draft_config = load_hf_config(source)
        if draft_config.vocab_size != hf_config.vocab_size:
            raise ModelLoadError(f"speculative_config model {spec.model!r}: vocab_size {draft_config.vocab_size} "
                                 f"differs from the target's {hf_config.vocab_size}; a draft model must share "
                                 "the target's tokenizer")
        model, _ = load_model(draft_config, source, self.dtype, self.device, self.config.model.quantization)
        max_position = min(draft_config.max_position_embeddings, hf_config.max_position_embeddings)
        return DraftModel(model, max_position, self.block_size, self.device)

    def _load_eagle(self, hf_config) -> EagleProposer:
        """The EAGLE head of speculative_config, checked against the target it reads."""
        spec = self.config.speculative
        source = resolve_model(spec.model)
        head_config = load_hf_config(source)
        where = f"speculative_config model {spec.model!r} (an {spec.method} head)"
        target_hidden = hf_config.hidden_size
        head_target_hidden = getattr(head_config, "target_hidden_size", None) or head_config.hidden_size
        if head_target_hidden != target_hidden or head_config.vocab_size != hf_config.vocab_size:
            raise ModelLoadError(f"{where}: reads hidden states of size {head_target_hidden} over a vocabulary of "
                                 f"{head_config.vocab_size}; the target has hidden_size {target_hidden} and "
                                 f"vocab_size {hf_config.vocab_size}")
        if getattr(head_config, "model_type", "llama") != "llama":
            raise ModelLoadError(f"{where}: EAGLE heads are Llama layers (model_type 'llama'); "
                                 f"got model_type {head_config.model_type!r}")
        aux_layers = aux_hidden_state_layers(head_config, hf_config.num_hidden_layers) \
            if spec.method == "eagle3" else ()
        model, _ = load_model(head_config, source, self.dtype, self.device, "none",
                              model_class=EAGLE_HEADS[spec.method].model_class(), keep_stored=("d2t",))
        model.share_target_embeddings(self.model)
        if spec.method == "eagle":
            model.lm_head = self.model.lm_head
        else:
            check_draft_vocabulary(model, hf_config.vocab_size, where)
        max_position = min(head_config.max_position_embeddings, hf_config.max_position_embeddings)
        return EagleProposer(model, self.model, max_position, self.block_size, self.device, aux_layers)

    # ---- KV cache --------------------------------------------------------------------
    def _layers_can_share_kv(self) -> bool:
        """Hybrid KV cache groups (kv_cache_manager.py) share cache tensors between layers: every
        layer's block must be alike, every rank must hold every layer (a pipeline stage holds
        some), and no draft model may read the target's block tables. Off by
        disable_hybrid_kv_cache_manager."""
        if self.config.scheduler.disable_hybrid_kv_cache_manager or self.draft is not None \
                or get_pp_group().num_stages > 1:
            return False
        layouts = {(attn.kv_cache_shape(1, self.block_size), attn.kv_cache_dtype(self.dtype))
                   for attn in self.attention_layers}
        return len(layouts) == 1

    def bytes_per_block(self) -> int:
        """K and V of what one block id addresses, a block of every cache tensor (of each layer of the
        first group, a largest), as each layer's attention backend lays them out (in the KV cache
        dtype): every sizing of the cache asks this, nowhere else."""
        return sum(self.attention_layers[layer].bytes_per_block(self.block_size, self.dtype)
                   for layer in self.kv_groups[0].layers)

    def choose_num_blocks(self, max_useful_blocks: int) -> int:
        """Blocks from an exact override, a byte budget, a fraction of available memory, or
        vLLM's fixed 4 GiB default; never more than the memory free once the weights are loaded
        (a cache that overcommits memory gets the process OOM-killed later, mid-request)."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if not self.attention_layers:  # encoder-only: blocks are bookkeeping, they hold no bytes
            return max_useful_blocks
        free = available_memory_bytes()  # the weights are resident by now
        if cache.kv_cache_memory_bytes is not None:
            budget, source = cache.kv_cache_memory_bytes, "kv_cache_memory_bytes"
        elif cache.kv_cache_memory_fraction is not None:
            budget = int(free * cache.kv_cache_memory_fraction)
            source = f"kv_cache_memory_fraction={cache.kv_cache_memory_fraction} of free memory"
        else:
            budget, source = DEFAULT_KV_CACHE_BYTES, "the default, as vLLM on CPU"
        num_blocks = int(min(budget // self.bytes_per_block(), max_useful_blocks, MAX_NUM_BLOCKS))
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory_bytes={budget} holds no KV block; one block of {self.block_size} "
                f"tokens needs {self.bytes_per_block()} bytes"
            )
        size, resident = num_blocks * self.bytes_per_block(), psutil.Process().memory_info().rss
        if size > free:
            raise ValueError(
                f"the KV cache ({_gib(size)}, from {source}) does not fit: only {_gib(free)} of memory is free "
                f"with the weights loaded (this process holds {_gib(resident)}); lower --kv-cache-memory-bytes "
                "(kv_cache_memory_bytes) or --gpu-memory-utilization, or free memory"
            )
        logger.info("KV cache: %s, from %s (at most what max_num_seqs x max_model_len can use); %s of memory "
                    "free with the weights loaded (this process holds %s)", _gib(size), source, _gib(free),
                    _gib(resident))
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One zeroed tensor per layer: attention reads whole blocks, and masked-out garbage
        (NaN * 0) would poison real rows."""
        if not self.attention_layers:
            return
        # one tensor per layer of the first group; the i-th layer of every group keeps its KV in the i-th
        slots = [self.attention_layers[layer] for layer in self.kv_groups[0].layers]
        shapes = [attn.kv_cache_shape(num_blocks, self.block_size) for attn in slots]
        dtypes = [attn.kv_cache_dtype(self.dtype) for attn in slots]
        if self.device.type != "cpu":
            self.kv_tensors = [torch.zeros(shape, dtype=dtype, device=self.device)
                               for shape, dtype in zip(shapes, dtypes)]
        else:
            flat = _zeroed_host_memory(num_blocks * self.bytes_per_block())
            sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes)]
            self.kv_tensors = [part.view(dtype).view(shape)
                               for part, shape, dtype in zip(flat.split(sizes), shapes, dtypes)]
        caches: list[torch.Tensor | None] = [None] * len(self.attention_layers)
        for group in self.kv_groups:
            for slot, layer in enumerate(group.layers):
                caches[layer] = self.kv_tensors[slot]
        self.kv_caches = caches
        if self.draft is not None:
            self.draft.kv_caches = self.kv_caches[self.num_target_layers:]
        if self.device.type != "cpu":
            return
        self._populate_stop = threading.Event()
        self.kv_populator = threading.Thread(target=_populate_when_idle, args=(self.kv_tensors, self._populate_stop),
                                             name="kv-populate", daemon=True)
        self.kv_populator.start()
        # at exit, a thread still inside a call would be torn down mid-call; hold no reference to self
        atexit.register(_stop_thread, self.kv_populator, self._populate_stop)

    def populate_kv(self) -> None:
        """Fault the whole cache in here and now, on every core, in place of the idle-time thread:
        for a batch that starts at once, where the faults would otherwise land inside its steps."""
        if not self.kv_caches or self.device.type != "cpu":
            return
        _stop_thread(self.kv_populator, self._populate_stop)
        parts = max(1, torch.get_num_threads())
        workers = [threading.Thread(target=_populate, args=(self.kv_tensors, threading.Event(), part, parts))
                   for part in range(parts)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    # ---- one step --------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        self.input_batch.update(sched)
        out = RunnerOutput()
        if not sched.total_num_scheduled_tokens:
            return out
        requests = self.input_batch.requests
        ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        chunks: list[tuple[CachedRequestState, int]] = []  # (request, index of its first row)
        mrope: tuple[list[int], ...] = ([], [], [])  # M-RoPE models: temporal, height, width positions
        # (request, first row whose logits it samples, its drafts: one more row each)
        sample_rows: list[tuple[CachedRequestState, int, list[int]]] = []
        spec = sched.scheduled_spec_decode_tokens
        row_loras: list = []  # each row's LoRARequest (None: the base model), when LoRA is on
        for req_id, num_new in sched.num_scheduled_tokens.items():
            state = requests[req_id]
            if self.lora_manager is not None:
                row_loras.extend([state.lora_request] * num_new)
            drafts = spec.get(req_id, [])
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_new - len(drafts)
            chunks.append((state, len(ids)))
            ids.extend(state.token_ids(start, end))
            ids.extend(drafts)
            positions.extend(range(start, end + len(drafts)))
            if self.uses_mrope:
                self._mrope_positions(state, start, end + len(drafts), mrope)
            context_lens.append(start)
            block_tables.append(state.block_ids)
            if end == state.num_tokens and state.pooling_params is None:  # the model proposes the next one
                sample_rows.append((state, len(ids) - 1 - len(drafts), drafts))
        meta = self._attention_metadata(list(sched.num_scheduled_tokens.values()), context_lens, block_tables)
        if self.lora_manager is not None:
            failed = self.lora_manager.prepare_step(row_loras)  # adapters that no longer load: their rows run bare
            for req_id in sched.num_scheduled_tokens if failed else ():
                lora = requests[req_id].lora_request
                if lora is not None and lora.lora_int_id in failed:
                    out.errors[req_id] = failed[lora.lora_int_id]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        input_positions = torch.tensor(mrope if self.uses_mrope else positions, dtype=torch.long, device=self.device)
        inputs_embeds = self._inputs_embeds(input_ids, chunks, sched, out) if self.encoder_cache else None
        extra = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        hidden = self.model(input_ids, input_positions, self.kv_caches[: self.num_target_layers], meta, **extra)
        if not get_pp_group().is_last:
            return out  # the hidden states went on to the next stage, which samples
        if spec:
            rows = [row + j for _, row, drafts in sample_rows for j in range(len(drafts) + 1)]
            self._verify(self.compute_logits(hidden, rows), sample_rows, out, sched.grammar_bitmask)
        elif sample_rows:
            logits = self.compute_logits(hidden, [row for _, row, _ in sample_rows])
            self._sample(logits, [state for state, _, _ in sample_rows], out, sched.grammar_bitmask)
        speculate = self.config.speculative.speculates(len(sched.num_scheduled_tokens))
        if isinstance(self.draft, EagleProposer):
            self._eagle_step(hidden, chunks, sched, out, speculate)
        else:
            if self.draft is not None:
                self.draft.ride_along(input_ids, input_positions, meta)
            if speculate:
                self._propose(out, sched)
        if self.pooler is not None:
            self._pool(hidden, chunks, sched, out)
        for state, first_row in chunks:
            if state.sampling.params.prompt_logprobs is not None:
                num_new = sched.num_scheduled_tokens[state.req_id]
                self._prompt_logprobs(hidden[first_row : first_row + num_new], state, num_new, out)
        return out

    def _attention_metadata(self, query_lens: list[int], context_lens: list[int],
                            block_tables: list[list[list[int]]]) -> AttentionMetadata:
        """The step's attention metadata: one per KV cache group (block_tables: per request, a table per
        group), the first's by_kv_group listing them all."""
        metas = [build_attention_metadata(query_lens, context_lens, [tables[group] for tables in block_tables],
                                          self.block_size, self.device) for group in range(len(self.kv_groups))]
        metas[0].by_kv_group = metas
        return metas[0]

    def _mrope_positions(self, state: CachedRequestState, start: int, end: int, rows: tuple[list[int], ...]) -> None:
        """Append the M-RoPE positions (three rows) of a request's tokens [start, end), from the
        request alone (its prompt and image grids), whatever the step: prompt chunks, prefix-cache
        hits and recomputation after preemption all read the same table; tokens after the prompt
        sit at their index + delta."""
        if state.mrope_positions is None:
            table, state.mrope_delta = self.model.mrope_positions(len(state.prompt_token_ids), state.mm_features)
            state.mrope_positions = table.tolist()
        num_prompt = len(state.prompt_token_ids)
        after = range(max(start, num_prompt) + state.mrope_delta, max(end, num_prompt) + state.mrope_delta)
        for row, prompt in zip(rows, state.mrope_positions):
            row.extend(prompt[start:min(end, num_prompt)])
            row.extend(after)

    def _inputs_embeds(self, input_ids: torch.Tensor, chunks: list[tuple[CachedRequestState, int]],
                       sched: SchedulerOutput, out: RunnerOutput) -> torch.Tensor | None:
        """The step's token embeddings with each image's encoder output at its placeholder rows
        (a chunk may hold part of an image's run); None when no image is in this step."""
        spans = []  # (request, image index, image, its chunk's first row, chunk start, chunk end)
        for state, first_row in chunks:
            start = state.num_computed_tokens
            end = start + sched.num_scheduled_tokens[state.req_id]
            spans += [(state, i, f, first_row, start, end) for i, f in enumerate(state.mm_features)
                      if f.overlaps(start, end)]
        if not spans:
            return None
        for state, index, feature, *_ in spans:
            if index not in state.mm_queried:  # counted once per request and image
                state.mm_queried.add(index)
                out.mm_cache_queries += 1
                out.mm_cache_hits += feature.identifier in self.encoder_cache
        encoded = self.encoder_cache.get_many([feature for _, _, feature, *_ in spans])
        embeds = self.model.embed_input_ids(input_ids)
        for _, _, feature, first_row, start, end in spans:
            lo, hi = max(start, feature.offset), min(end, feature.offset + feature.length)
            embeds[first_row + lo - start: first_row + hi - start] = \
                encoded[feature.identifier][lo - feature.offset: hi - feature.offset].to(embeds.dtype)
        return embeds

    def _pool(self, hidden: torch.Tensor, chunks: list[tuple[CachedRequestState, int]], sched: SchedulerOutput,
              out: RunnerOutput) -> None:
        """Fold each pooling request's chunk in; those whose prompt ended get their vector."""
        for req_id in sched.finished_req_ids:
            self.pooler.drop(req_id)
        out.pooler_output.update(self.pooler.pool_step(hidden, [
            PoolChunk(state.req_id, first_row, sched.num_scheduled_tokens[state.req_id], state.num_computed_tokens,
                      len(state.prompt_token_ids), state.pooling_params)
            for state, first_row in chunks if state.pooling_params is not None]))

    def compute_logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Logits at any rows of the step's hidden states (one per sample, in this order)."""
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])

    def _sample(self, logits: torch.Tensor, rows: list[CachedRequestState], out: RunnerOutput,
                grammar: GrammarBitmask | None) -> None:
        """One token per logits row; a request's tokens (and logprobs) gather in a list."""
        meta = SamplingMetadata.build([s.sampling for s in rows], self.vocab_size, self.device,
                                      self._row_bitmask(rows, grammar))
        result = self.sampler(logits, meta)
        sampled = out.sampled_token_ids
        for state, token in zip(rows, result.sampled_token_ids.tolist()):
            sampled.setdefault(state.req_id, []).append(token)
        if result.logprobs is not None:
            lp = result.logprobs
            ids, values, ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
            for row, state in enumerate(rows):
                k = state.sampling.params.logprobs
                if k is None:
                    continue
                k = lp.token_ids.shape[1] - 1 if k < 0 else k
                out.logprobs.setdefault(state.req_id, []).append((ids[row][: k + 1], values[row][: k + 1], ranks[row]))

    def _verify(self, logits: torch.Tensor, samples: list[tuple[CachedRequestState, int, list[int]]],
                out: RunnerOutput, grammar: GrammarBitmask | None) -> None:
        """Requests with drafts keep the verified prefix plus one token; the others sample one."""
        rows = [state for state, _, drafts in samples for _ in range(len(drafts) + 1)]
        verified = self.rejection_sampler(logits, [(state.sampling, drafts) for state, _, drafts in samples],
                                          self.vocab_size, self._row_bitmask(rows, grammar))
        for (state, _, _), tokens, logprobs in zip(samples, verified.token_ids, verified.logprobs):
            out.sampled_token_ids[state.req_id] = tokens
            if logprobs is not None:
                out.logprobs[state.req_id] = logprobs

    def _propose(self, out: RunnerOutput, sched: SchedulerOutput) -> None:
        """Drafts for the next step of every request that just sampled, as many as the scheduler
        allows it (none while it rests)."""
        requests = self.input_batch.requests
        wanted = [(req_id, tokens, sched.max_drafts[req_id]) for req_id, tokens in out.sampled_token_ids.items()
                  if req_id in sched.max_drafts]
        if self.ngram is not None:  # from each request's own context
            for req_id, tokens, budget in wanted:
                state = requests[req_id]
                drafts = self.ngram.propose(state.prompt_token_ids + state.output_token_ids + tokens)[:budget]
                if drafts:
                    out.spec_token_ids[req_id] = drafts
            return
        starts = []  # from the draft model, starting at each request's newest token
        for req_id, tokens, budget in wanted:
            state = requests[req_id]
            num_known = sched.num_scheduled_tokens[req_id] - len(sched.scheduled_spec_decode_tokens.get(req_id, ()))
            position = state.num_computed_tokens + num_known + len(tokens) - 1
            starts.append((req_id, tokens[-1], position, state.block_ids[0], budget))
        out.spec_token_ids.update(self.draft.propose(starts))

    def _eagle_step(self, hidden: torch.Tensor, chunks: list[tuple[CachedRequestState, int]],
                    sched: SchedulerOutput, out: RunnerOutput, speculate: bool) -> None:
        """The EAGLE head reads every position of the step whose next token is now known (rejected
        drafts' positions are dropped), then drafts from each request that sampled."""
        batch = HeadBatch()
        spec = sched.scheduled_spec_decode_tokens
        for state, first_row in chunks:
            num_known = sched.num_scheduled_tokens[state.req_id] - len(spec.get(state.req_id, ()))
            start = state.num_computed_tokens
            sampled = out.sampled_token_ids.get(state.req_id)
            # the token after each position: known ones, then (for the last known) what was sampled
            following = (state.token_ids(start + 1, start + num_known) + sampled if sampled
                         else state.token_ids(start + 1, start + num_known + 1))
            budget = sched.max_drafts.get(state.req_id, 0) if speculate and sampled else 0
            batch.add(state.req_id, start, first_row, following, state.block_ids[0], budget)
        head_hidden = self.draft.ride_along(batch, self.draft.target_features(hidden))
        out.spec_token_ids.update(self.draft.propose(batch, head_hidden))

    @staticmethod
    def _row_bitmask(rows: list[CachedRequestState], grammar: GrammarBitmask | None) -> RowBitmask | None:
        """The scheduler's bitmask rows (keyed by request, a request's rows in position order)
        placed at these sampling rows (likewise a request's rows in order)."""
        if grammar is None:
            return None
        rows_of: dict[str, list[int]] = {}
        for row, state in enumerate(rows):
            rows_of.setdefault(state.req_id, []).append(row)
        taken: dict[str, int] = {}
        constrained = []
        for req_id in grammar.req_ids:
            index = taken.get(req_id, 0)
            constrained.append(rows_of[req_id][index])
            taken[req_id] = index + 1
        bitmask = torch.full((len(rows), grammar.bitmask.shape[1]), -1, dtype=grammar.bitmask.dtype)
        bitmask[constrained] = grammar.bitmask
        return RowBitmask(constrained, bitmask)

    def _prompt_logprobs(self, hidden: torch.Tensor, state: CachedRequestState, num_new: int,
                         out: RunnerOutput) -> None:
        """Logprobs of prompt tokens 1.. predicted from this chunk's positions."""
        chunk_start = state.num_computed_tokens
        start = max(chunk_start, state.num_prompt_logprobs_done)  # a preempted request recomputes
        end = min(chunk_start + num_new, len(state.prompt_token_ids) - 1)
        if end <= start:
            return
        state.num_prompt_logprobs_done = end
        targets = torch.tensor(state.prompt_token_ids[start + 1 : end + 1], device=self.device)
        logits = self.model.compute_logits(hidden[start - chunk_start : end - chunk_start])
        k = state.sampling.params.prompt_logprobs
        k = self.vocab_size if k < 0 else k
        lp = compute_prompt_logprobs(logits, targets, k)
        ids, values, ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
        out.prompt_logprobs[state.req_id] = list(zip(ids, values, ranks))
