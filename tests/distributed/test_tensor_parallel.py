"""Tensor parallel and pipeline stages over gloo (two worker processes): logits equal one rank's
for every family sluice serves (at the model, in one launch of two ranks); greedy tokens equal one
rank's, token for token in float32, through the engine (int8, GGUF and compressed-tensors weights
included); the scheduler's paths (batched, chunked, preempted, prefix-warm) hold under TP=2 (and
under PP=2 with micro-batches in test_pipeline_parallel.py); `sluice serve -tp 2` answers the
openai client the same; a dead rank fails the step with its reason (and takes a server down); bad
configurations are refused at start, naming the numbers."""

from __future__ import annotations

import os

import gguf
import openai
import pytest
import torch
import transformers

from sluice import LLM, SamplingParams
from sluice.distributed import Communicator, PipelineStage
from sluice.executor.abstract import WorkerDiedError

from tests.models.test_families_llm import save_tiny
from tests.models.test_model_forward import CONFIGS
from tests.models.test_moe import CONFIGS as MOE_CONFIGS
from tests.models.test_moe import hf_model as moe_model
from tests.models.test_moe import write_gguf as write_moe_gguf
from tests.server.utils import RemoteServer

NUM_TOKENS = 16
PROMPT = [1, 17, 42, 7, 99, 3, 250, 8, 61]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
TINY = dict(dtype="float32", max_model_len=64, kv_cache_memory_bytes=4 << 20)
UNTIED = {"tie_word_embeddings": False}  # tied, the tiny Gemmas' scaled embeddings echo the last token
# switches a rank must get right: one KV head (replicated on both ranks) with o/down biases (added on
# rank 0 only), an odd vocabulary (the last rank's rows padded), OLMo2's q/k norm over every head with
# one KV head (replicated heads counted once)
CHANGES = {"llama31_tied": {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
           "qwen3": {"vocab_size": 401}, "gemma3": UNTIED, "olmo2": {"num_key_value_heads": 1}}
OPTIONS = {"llama-int8": {"quantization": "int8"}}
# through the engine (every family is split at the model by test_every_family_split_equals_one_rank):
# Llama with --quantization int8 (o and down split by whole Q8_0 blocks; in stages, each stage's
# blocks), Gemma 3's windowed layer on the first stage and its global one on the second (the KV
# manager must keep what the second reads)
CASES = [("llama-int8", {"tensor_parallel_size": 2}), ("llama-int8", {"pipeline_parallel_size": 2}),
         ("gemma3", {"pipeline_parallel_size": 2})]


def tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("name, ranks", CASES, ids=[f"{n}-{'tp' if 'tensor_parallel_size' in r else 'pp'}2"
                                                    for n, r in CASES])
def test_two_ranks_greedy_equals_one_rank(name, ranks, tmp_path, monkeypatch):
    arch = name.partition("-")[0]
    config = MOE_CONFIGS[arch]() if arch in MOE_CONFIGS else CONFIGS[arch]()
    for field, value in CHANGES.get(name, {}).items():
        setattr(config, field, value)
    monkeypatch.setitem(CONFIGS, arch, lambda: config)
    save_tiny(arch, tmp_path)
    options = {**TINY, **OPTIONS.get(name, {})}
    [one] = tokens(LLM(str(tmp_path), **options), [PROMPT])
    assert len(set(one)) > 4, one  # a continuation worth comparing
    llm = LLM(str(tmp_path), **options, **ranks)
    try:
        assert llm.config.parallel.distributed_executor_backend == "mp"  # implied by several ranks
        assert tokens(llm, [PROMPT]) == [one]
    finally:
        llm.engine_core.shutdown()


# ---- every family, at the model: one launch of two gloo ranks ------------------------------------
FAMILIES = [name for name in CONFIGS if name != "llama"] + list(MOE_CONFIGS)  # llama: its variants


def save_family(name: str, folder) -> str:
    """A tiny random checkpoint of the family as transformers saves it (per-expert tensors for the
    mixture-of-experts ones), with CHANGES' switches, biases and norms random too."""
    if name in MOE_CONFIGS:
        moe_model(name, vocab_size=300).save_pretrained(folder)
        return str(folder)
    config = CONFIGS[name]()
    for field, value in CHANGES.get(name, {}).items():
        setattr(config, field, value)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers starts biases and norm weights at 0 and 1: make them count
        for param_name, param in hf.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(folder)
    return str(folder)


def split_logits(folder: str, tp: Communicator, pp: PipelineStage) -> torch.Tensor | None:
    """The model of folder loaded as this rank holds it on these ranks (load_model: its tensors
    sliced as they stream in): logits of a varlen prefill of three prompts and three decode steps
    through the paged cache; None on a stage that does not end the pipeline."""
    from sluice import distributed
    from sluice.loader import load_hf_config, resolve_model
    from sluice.worker.model_runner import load_model
    from tests.models.test_model_forward import MiniRunner

    distributed._TP, distributed._PP = tp, pp
    source = resolve_model(folder)
    model, _ = load_model(load_hf_config(source), source, torch.float32, torch.device("cpu"), "none")
    runner = MiniRunner(model.eval())
    runner.kv_caches = runner.kv_caches[: len(model.model.local_layers())]  # this stage's layers
    gen = torch.Generator().manual_seed(1)
    steps = [{rid: torch.randint(3, 300, (n,), generator=gen).tolist() for rid, n in enumerate((7, 12, 3))}]
    steps += [{rid: [int(t)] for rid, t in enumerate(torch.randint(3, 300, (3,), generator=gen))} for _ in range(3)]
    logits = [torch.cat(list(runner.step(step).values())) for step in steps]
    return torch.cat(logits) if pp.is_last else None


def families_on_rank(rank: int, init_method: str, folders: dict[str, str]) -> None:
    """Rank `rank` of two: every family whole, then as tensor-parallel rank `rank`, then as
    pipeline stage `rank`; the split logits must be the whole model's (float32 rounding)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    splits = {"tp2": (Communicator(rank, 2, dist.group.WORLD), PipelineStage()),
              "pp2": (Communicator(), PipelineStage(rank, 2, 0 if rank else None, None if rank else 1))}
    try:
        for name, folder in folders.items():
            whole = split_logits(folder, Communicator(), PipelineStage())
            for split, (tp, pp) in splits.items():
                got = split_logits(folder, tp, pp)
                if got is not None:
                    torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-4,
                                               msg=lambda m, where=f"{name} {split}": f"{where}: {m}")
    finally:
        dist.destroy_process_group()


def test_every_family_split_equals_one_rank(tmp_path):
    """Every family sluice serves (and Llama's variants: tied with one KV head replicated on both
    ranks and o/down biases added on rank 0 only, Llama 3.1 and YaRN rope), the mixture-of-experts
    ones (each rank 1/2 of every expert; Qwen2-MoE's shared expert summed with the routed ones in one
    all-reduce, beside a dense layer), Qwen3's odd vocabulary (the last rank's rows padded), Phi-3's
    fused checkpoint projections and Phi-4's partial rotary, OLMo2's q/k norm over every head with
    one KV head, Gemma 3's windowed and global layers on different stages: on two tensor-parallel
    ranks and on two pipeline stages the logits equal one rank's, in one launch of two ranks."""
    from sluice.executor.mp import free_port

    folders = {name: save_family(name, tmp_path / name) for name in FAMILIES}
    torch.multiprocessing.spawn(families_on_rank, args=(f"tcp://127.0.0.1:{free_port()}", folders), nprocs=2)


def test_gguf_blocks_split_at_whole_blocks_equal_one_rank(tmp_path):
    """A tiny Mixtral GGUF with Q8_0 linear layers and Q4_0 experts, run on its blocks: rows split
    as stored, o / down / the experts' down split at whole blocks of 32 (their bytes), the
    embedding dequantized on the ranks (each looks up its vocabulary rows)."""
    hf = moe_model("mixtral", vocab_size=300)
    path = str(tmp_path / "tiny-mixtral.gguf")
    Q = gguf.GGMLQuantizationType
    write_moe_gguf(hf, path, "llama", expert_types={"gate": Q.Q4_0, "up": Q.Q4_0, "down": Q.Q4_0},
                   linear_type=Q.Q8_0)
    options = {**TINY, "quantization": "gguf"}
    [one] = tokens(LLM(path, **options), [PROMPT])
    assert len(set(one)) > 4, one
    llm = LLM(path, **options, tensor_parallel_size=2)
    try:
        assert tokens(llm, [PROMPT]) == [one]
    finally:
        llm.engine_core.shutdown()


COMPRESSED = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=4 << 20)


COMPRESSED_PROMPTS = [PROMPT, list(range(100, 160))]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> tuple[str, list[list[int]]]:
    """A tiny Llama with peaky logits as an int8 checkpoint as stored (compressed-tensors W8A8, a
    scale per output channel), and one rank's tokens on it. (W8A8 rounds each activation to 8 bits,
    so a last-bit difference between paths may move a value across a rounding boundary: peaky
    logits keep that from reaching a greedy choice.)"""
    from tests.quantization.test_int8 import write_checkpoints

    folder = tmp_path_factory.mktemp("compressed")
    save_tiny("llama", folder / "dense")
    target = str(folder / "w8a8")
    write_checkpoints(str(folder / "dense"), target, str(folder / "twin"))
    one = tokens(LLM(target, **COMPRESSED), COMPRESSED_PROMPTS)
    assert all(len(set(t)) > 4 for t in one), one
    return target, one


@pytest.mark.parametrize("ranks", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_compressed_tensors_checkpoint_split_equals_one_rank(ranks, compressed):
    """q/k/v and gate/up split by rows with their scales, o and down by input columns, their
    scales whole on every rank (under W8A8 each rank's share of an activation row quantized with
    the whole row's scale: per-rank scales part from one rank's tokens within a few steps); in
    stages, each stage's layers."""
    target, one = compressed
    llm = LLM(target, **COMPRESSED, **ranks)
    try:
        assert llm.engine_core.quantization == "compressed-tensors"
        assert tokens(llm, COMPRESSED_PROMPTS) == one
    finally:
        llm.engine_core.shutdown()


# ---- the scheduler's paths under TP=2 (the tiny Llama of tests/utils: real vocabulary, GQA) -----
SHARED = list(range(300, 340))  # 40 tokens: two full 16-token blocks shared by every prompt
PROMPTS = [SHARED + [5, 6, 7], SHARED + list(range(1000, 1020)), SHARED + [42] * 9, SHARED + [9000, 12]]
PATHS = dict(dtype="float32", max_model_len=256, block_size=16)


@pytest.fixture(scope="module")
def lone(tiny_model_dir) -> list[list[int]]:
    llm = LLM(tiny_model_dir("llama"), **PATHS, enable_prefix_caching=False, kv_cache_memory_bytes=16 << 20)
    return [tokens(llm, [p])[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def tp_llm(tiny_model_dir):
    # 13 usable blocks of 16 cannot hold four ~80-token requests (preemption); 32-token chunks; a
    # draft model (another tiny family, same vocabulary) split across the ranks as the target is
    draft = {"method": "draft_model", "model": tiny_model_dir("qwen2"), "num_speculative_tokens": 3}
    llm = LLM(tiny_model_dir("llama"), **PATHS, tensor_parallel_size=2, num_gpu_blocks_override=14,
              max_num_batched_tokens=32, enable_prefix_caching=True, speculative_config=draft)
    yield llm
    llm.engine_core.shutdown()


def check_scheduler_paths(llm: LLM, lone: list[list[int]]) -> None:
    assert tokens(llm, PROMPTS) == lone  # batched, in 32-token chunks, preempted
    metrics = llm.get_metrics()
    assert metrics["vllm:num_preemptions"] > 0
    assert tokens(llm, PROMPTS[:1]) == lone[:1]  # prefix-warm
    assert llm.get_metrics()["vllm:prefix_cache_hits"] - metrics["vllm:prefix_cache_hits"] >= 32


def test_tp2_batched_chunked_preempted_and_prefix_warm_equal_lone(tp_llm, lone):
    """... and speculative: the draft's proposals, the same on every rank, verified by the target."""
    check_scheduler_paths(tp_llm, lone)
    assert tp_llm.get_metrics()["vllm:spec_decode_num_draft_tokens"] > 0


def test_each_rank_holds_its_share_and_reports_collectives(tp_llm):
    executor = tp_llm.engine_core.executor
    assert len(executor.workers) == 2
    stats = executor.collective_rpc("communication_stats")
    assert all(s["calls"] > 0 and s["seconds"] > 0 for s in stats)  # all-reduces ran on both ranks
    cpus = [os.sched_getaffinity(w.process.pid) for w in executor.workers]
    assert not cpus[0] & cpus[1]  # each rank on its own share of the CPUs


def test_a_dead_rank_fails_the_step_with_its_reason(tp_llm):
    rank1 = tp_llm.engine_core.executor.workers[1].process
    rank1.kill()
    rank1.wait()
    with pytest.raises(WorkerDiedError, match=rf"pid {rank1.pid}\) died .*rank 1 of 2"):
        tp_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)


def test_served_tp2_answers_like_one_rank_and_a_dead_rank_takes_the_server_down(tiny_model_dir):
    folder = tiny_model_dir("llama")
    [offline] = LLM(folder, dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20).generate(
        [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    server = RemoteServer(folder, "--dtype", "float32", "--max-model-len", "256", "-tp", "2")
    try:
        client = server.client()
        model = client.models.list().data[0].id
        served = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0.0)
        assert served.choices[0].text == offline.outputs[0].text
        ranks = [p for p in server.core_process().children() if "sluice.executor.mp" in p.cmdline()]
        assert len(ranks) == 2
        ranks[1].kill()
        with pytest.raises(openai.APIStatusError) as failure:
            client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8)
        assert failure.value.status_code == 503
        assert f"(pid {ranks[1].pid}) died" in failure.value.message
        assert server.process.wait(120) != 0  # the core died with its rank: the server exits for a restart
    finally:
        server.stop()


def test_default_model_on_two_stages_equals_one_rank_and_refuses_two_tensor_ranks():
    """SmolLM2 (30 layers, 9 heads): two pipeline stages give one rank's tokens, each stage on its
    layers' GGUF blocks where the kernel runs (the hidden states cross in float32, not the
    embedding's block bytes); 9 heads cannot be split over two tensor-parallel ranks."""
    from sluice.quantization.gguf import kernel_available

    options = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=16 << 20)
    prompts = [[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47], PROMPT]
    one = tokens(LLM(**options), prompts)
    llm = LLM(**options, pipeline_parallel_size=2)
    try:
        assert llm.engine_core.quantization == ("gguf" if kernel_available() else "none")
        assert tokens(llm, prompts) == one
    finally:
        llm.engine_core.shutdown()
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(--tensor-parallel-size, -tp\)=2 must divide "
                                         r"the model's num_attention_heads=9"):
        LLM(**options, tensor_parallel_size=2)


# ---- refused at start ---------------------------------------------------------------------------
def test_tp_not_dividing_the_heads_is_refused_naming_them(tmp_path, monkeypatch):
    config = CONFIGS["llama"]()
    config.num_attention_heads, config.num_key_value_heads, config.hidden_size = 3, 3, 48
    monkeypatch.setitem(CONFIGS, "llama", lambda: config)
    save_tiny("llama", tmp_path)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(--tensor-parallel-size, -tp\)=2 must divide "
                                         r"the model's num_attention_heads=3 \(LlamaForCausalLM\)"):
        LLM(str(tmp_path), **TINY, tensor_parallel_size=2)


def test_more_stages_than_layers_are_refused_naming_them(tiny_model_dir):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(--pipeline-parallel-size, -pp\)=3 is more than "
                                         r"the model's num_hidden_layers=2"):
        LLM(tiny_model_dir("llama"), **TINY, pipeline_parallel_size=3, distributed_executor_backend="ray")


def test_an_architecture_that_cannot_be_split_is_refused_by_name():
    from sluice.distributed.sharding import check_parallel
    from sluice.models.registry import MODEL_REGISTRY

    bert = MODEL_REGISTRY["BertModel"].model_class()
    with pytest.raises(ValueError, match=r"BertModel cannot run tensor-parallel .*use tensor_parallel_size"):
        check_parallel(CONFIGS["llama"](), bert, 2, 1)


def test_experts_not_dividing_into_the_ranks_are_refused_naming_the_width():
    from sluice.distributed.sharding import check_parallel
    from sluice.models.qwen2_moe import Qwen2MoeForCausalLM

    config = MOE_CONFIGS["qwen2_moe"]()
    config.shared_expert_intermediate_size = 90
    with pytest.raises(ValueError, match=r"=4 must divide the model's shared_expert_intermediate_size=90"):
        check_parallel(config, Qwen2MoeForCausalLM, 4, 1)


def test_quantized_shares_that_cut_blocks_are_refused_naming_the_layer(monkeypatch):
    """o / down split into input shares that are not whole blocks: int8 and GGUF refuse at load."""
    from sluice import distributed
    from sluice.layers.linear import RowParallelLinear
    from sluice.quantization.gguf import check_split
    from sluice.quantization.int8 import Int8Config

    monkeypatch.setattr(distributed, "_TP", distributed.Communicator(0, 2))
    down = "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=rf"quantization='int8' .*tensor_parallel_size=2: {down} splits its 96 "
                                         "inputs into shares of 48, not whole int8 blocks of 32"):
        Int8Config().get_linear_method(RowParallelLinear(48, 64), [down])
    with pytest.raises(ValueError, match=rf"quantization='gguf' .*{down} \(Q4_K\) splits its 256 inputs into "
                                         "shares of 128, not whole blocks of 256"):
        check_split(down, 128, gguf.GGMLQuantizationType.Q4_K)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"),
     "tensor_parallel_size=2 runs a worker process per rank: distributed_executor_backend"),
    (dict(tensor_parallel_size=64),
     r"tensor_parallel_size=64 \(--tensor-parallel-size, --pipeline-parallel-size\) x data_parallel_size=1: 64 "
     r"ranks need a CPU each"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be an int >= 1; got 0"),
])
def test_bad_parallel_configs_are_refused(kwargs, message):
    from sluice.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(**kwargs)
