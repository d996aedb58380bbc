"""Speculative decoding (n-gram) is lossless: greedy output equals greedy output without it on
every scheduler path, and sampled output follows the target's distribution exactly."""

from __future__ import annotations

import collections

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.sampling_params import SamplingParams as Params
from sluice.structured_output.params import StructuredOutputsParams
from sluice.worker.rejection_sampler import RejectionSampler
from sluice.worker.sampler import Sampler, SamplingMetadata, SamplingRow, sampling_probs

from tests.utils import memoryless_llama, smollm2_tokenizer

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
COMMON = dict(dtype="float32", quantization="none", max_model_len=256, block_size=16)  # exact: dense float32
MENU = "rye bread 3 euros, croissant 2 euros, baguette 1 euro, apple pie 4 euros"
TEXTS = [
    f"Menu: {MENU}.\nCopy the menu: rye bread",
    "def area(width, height):\n    return width * height\n\n\ndef area(width, height):\n",
    "Do you sell rye bread? Do you sell rye bread? Do you sell",
    "What time do you open on Sundays?",  # little to copy: drafts are mostly refused
]


def prompts() -> list[dict]:
    tok = smollm2_tokenizer()
    return [{"prompt_token_ids": tok.encode(text)} for text in TEXTS]


def tokens(llm: LLM, batch: list[dict], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=32 << 20)


@pytest.fixture(scope="module")
def plain_reference(plain) -> list[list[int]]:
    return [tokens(plain, [p])[0] for p in prompts()]


@pytest.fixture(scope="module")
def spec() -> LLM:
    return LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=32 << 20, speculative_config=NGRAM)


def test_lone_and_batched_equal_plain(spec, plain_reference):
    assert [tokens(spec, [p])[0] for p in prompts()] == plain_reference
    assert tokens(spec, prompts()) == plain_reference
    metrics = spec.get_metrics()
    drafts, accepted = metrics["vllm:spec_decode_num_draft_tokens"], metrics["vllm:spec_decode_num_accepted_tokens"]
    assert 0.3 * drafts < accepted < drafts  # drafts were kept and refused: both paths ran
    assert metrics["vllm:spec_decode_num_accepted_tokens_per_pos"] == accepted
    assert metrics["vllm:generation_tokens"] == 2 * sum(map(len, plain_reference))


def test_worker_process_equals_plain(plain_reference):
    llm = LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=32 << 20, speculative_config=NGRAM,
              distributed_executor_backend="mp")
    assert tokens(llm, prompts()) == plain_reference
    assert llm.get_metrics()["vllm:spec_decode_num_accepted_tokens"] > 0


def test_preemption_chunks_and_prefix_hits_equal_plain(plain_reference):
    # ~4 blocks of 16 per request at the end, drafts' slots included; 9 usable blocks cannot hold all four
    llm = LLM(**COMMON, enable_prefix_caching=True, num_gpu_blocks_override=10, max_num_batched_tokens=16,
              speculative_config=NGRAM)
    assert tokens(llm, prompts()) == plain_reference
    assert llm.get_metrics()["vllm:num_preemptions"] > 0
    assert tokens(llm, prompts()) == plain_reference  # prompts now hit the cache
    metrics = llm.get_metrics()
    assert metrics["vllm:prefix_cache_hits"] > 0
    assert metrics["sluice:num_free_blocks"] == 9  # no block leaked by refused drafts


def test_max_tokens_logprobs_and_penalties_match_plain(spec, plain, plain_reference):
    short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    assert tokens(spec, prompts(), short) == [t[:5] for t in plain_reference]

    with_logprobs = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    expected = plain.generate(prompts()[:2], with_logprobs, use_tqdm=False)
    got = spec.generate(prompts()[:2], with_logprobs, use_tqdm=False)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for e_step, g_step in zip(e.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert e_step.keys() == g_step.keys()
            for token in e_step:
                assert g_step[token].logprob == pytest.approx(e_step[token].logprob, abs=1e-4)
                assert g_step[token].rank == e_step[token].rank

    # each verified position sees the drafts before it as outputs: penalties, min_tokens
    penalised = SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.2, frequency_penalty=0.3,
                               min_tokens=3)
    assert tokens(spec, prompts()[:2], penalised) == tokens(plain, prompts()[:2], penalised)


def test_stop_strings_and_structured_output_match_plain(spec, plain):
    stop = SamplingParams(temperature=0.0, max_tokens=16, stop=["2 euros"])
    assert [o.outputs[0].text for o in spec.generate(prompts()[:1], stop, use_tqdm=False)] == \
        [o.outputs[0].text for o in plain.generate(prompts()[:1], stop, use_tqdm=False)]

    regex = StructuredOutputsParams(regex=r" [0-9] euros, (croissant|baguette) [0-9] euros?, [a-z ]+")
    constrained = SamplingParams(temperature=0.0, max_tokens=14, structured_outputs=regex)
    before = spec.get_metrics()["vllm:spec_decode_num_accepted_tokens"]
    assert [o.outputs[0].text for o in spec.generate(prompts()[:1], constrained, use_tqdm=False)] == \
        [o.outputs[0].text for o in plain.generate(prompts()[:1], constrained, use_tqdm=False)]
    assert spec.get_metrics()["vllm:spec_decode_num_accepted_tokens"] > before


# ---- draft model --------------------------------------------------------------------------------

@pytest.mark.parametrize("draft", ["itself", "tiny random"])
def test_draft_model_equals_plain(plain_reference, smollm2_gguf, tiny_model_dir, draft):
    """The default model drafting for itself (drafts nearly always kept) and a tiny random model of
    the same vocabulary (nearly always refused); with preemption in the second run."""
    model = smollm2_gguf if draft == "itself" else tiny_model_dir("llama")
    config = {"method": "draft_model", "model": model, "num_speculative_tokens": 3}
    llm = LLM(**COMMON, enable_prefix_caching=False, kv_cache_memory_bytes=32 << 20, speculative_config=config)
    assert tokens(llm, prompts()) == plain_reference
    metrics = llm.get_metrics()
    drafts, accepted = metrics["vllm:spec_decode_num_draft_tokens"], metrics["vllm:spec_decode_num_accepted_tokens"]
    assert drafts > 0
    assert accepted > 0.8 * drafts if draft == "itself" else accepted < 0.5 * drafts
    if draft == "itself":
        return
    # both models' layers in every block: 10 blocks cannot hold all four requests
    small = LLM(**COMMON, enable_prefix_caching=True, num_gpu_blocks_override=10, speculative_config=config)
    assert tokens(small, prompts()) == plain_reference
    assert small.get_metrics()["vllm:num_preemptions"] > 0
    assert small.get_metrics()["sluice:num_free_blocks"] == 9


def test_draft_model_with_another_vocabulary_is_refused(memoryless_model):
    with pytest.raises(ValueError, match="vocab_size 64 differs from the target's 49152"):
        LLM(**COMMON, speculative_config={"method": "draft_model", "model": memoryless_model,
                                          "num_speculative_tokens": 2})


# ---- the distribution ---------------------------------------------------------------------------

def _verify_many(p0: torch.Tensor, p1: torch.Tensor, draft: int, params: Params, n: int) -> list[list[int]]:
    """n requests, each verifying one draft against rows with logits log(p0) then log(p1)."""
    logits = torch.stack([p0.log(), p1.log()]).repeat(n, 1)
    requests = [(SamplingRow(params, [0], [], None, set()), [draft]) for _ in range(n)]
    return RejectionSampler(Sampler())(logits, requests, p0.numel(), None).token_ids


def _tv(samples: list[int], expected: torch.Tensor) -> float:
    counts = collections.Counter(samples)
    empirical = torch.tensor([counts[i] / len(samples) for i in range(expected.numel())])
    return 0.5 * float((empirical - expected).abs().sum())


@pytest.mark.parametrize("params", [Params(temperature=1.0), Params(temperature=0.7, top_p=0.8)],
                         ids=["t1", "t0.7-top_p0.8"])
def test_verified_tokens_follow_the_target_distribution(params):
    torch.manual_seed(0)
    p0 = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    p1 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    draft, n = 2, 4000
    rows = [SamplingRow(params, [0], [], None, set())] * 2
    target = sampling_probs(torch.stack([p0.log(), p1.log()]), SamplingMetadata.build(rows, 5, "cpu"))
    target = target / target.sum(dim=-1, keepdim=True)
    out = _verify_many(p0, p1, draft, params, n)
    first = [t[0] for t in out]
    second = [t[1] for t in out if len(t) == 2]  # the draft was kept: one more token from row 1
    assert all(t[0] == draft for t in out if len(t) == 2)
    assert _tv(first, target[0]) < 0.04
    assert len(second) == pytest.approx(n * float(target[0, draft]), rel=0.15)
    assert _tv(second, target[1]) < 0.06
    # a verifier that keeps every draft fails the same test
    assert _tv([draft] * n, target[0]) > 0.5


@pytest.fixture(scope="module")
def memoryless_model(tmp_path_factory) -> str:
    """Its next token depends on the current one only, so its samples revisit short n-grams and
    drafts are often right."""
    folder = tmp_path_factory.mktemp("tiny-memoryless")
    memoryless_llama(folder)
    return str(folder)


def test_sampled_output_distribution_matches_plain_end_to_end(memoryless_model):
    """Seeds make the first token the same in both runs (it is sampled before any draft exists);
    the second is verified against drafts, and must follow the same distribution."""
    start = {"prompt_token_ids": torch.randint(3, 64, (8,), generator=torch.Generator().manual_seed(0)).tolist()}
    plain_llm = LLM(memoryless_model, dtype="float32", max_num_seqs=64)
    # the model's own greedy path: what follows each token in it is that token's likeliest successor
    path = tokens(plain_llm, [start], SamplingParams(temperature=0.0, max_tokens=56, ignore_eos=True))[0]
    prompt = {"prompt_token_ids": start["prompt_token_ids"] + path}
    n = 800

    def first_two(llm: LLM) -> list[tuple[int, int]]:
        params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=i) for i in range(n)]
        return [tuple(o.outputs[0].token_ids[:2]) for o in llm.generate([prompt] * n, params, use_tqdm=False)]

    plain = first_two(plain_llm)
    spec_llm = LLM(memoryless_model, dtype="float32", max_num_seqs=64,
                   speculative_config={**NGRAM, "prompt_lookup_max": 1, "disable_by_batch_size": 64})
    spec = first_two(spec_llm)
    metrics = spec_llm.get_metrics()
    assert metrics["vllm:spec_decode_num_drafts"] > n / 2
    assert 0 < metrics["vllm:spec_decode_num_accepted_tokens"] < metrics["vllm:spec_decode_num_draft_tokens"]
    assert [t1 for t1, _ in spec] == [t1 for t1, _ in plain]
    support = sorted(set(plain) | set(spec))
    expected = torch.tensor([plain.count(pair) / n for pair in support])
    assert _tv([support.index(pair) for pair in spec], expected) < 0.08


# ---- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of ngram, draft_model, eagle, eagle3"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "needed for methods draft_model, eagle, eagle3"),
    ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "and only there"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "a model (a path or name) is needed"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an int in [1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens must be an int in [1, 16]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "1 <= prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown key(s) 'lookahead'"),
])
def test_bad_speculative_config_is_refused_at_start(config, message):
    with pytest.raises(ValueError, match="speculative_config") as info:
        LLM(**COMMON, speculative_config=config)
    assert message in str(info.value)
