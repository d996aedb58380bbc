"""The batched sampler against plain per-row references."""

import math

import numpy as np
import pytest
import torch

from sluice.sampling_params import SamplingParams
from sluice.structured_output.backend import allocate_bitmask
from sluice.worker.sampler import (
    RowBitmask,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
)

V = 64
NEG_INF = float("-inf")


def row(params=None, prompt=(), output=(), seed=None, stop=()):
    params = params or SamplingParams()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, list(prompt), list(output), generator, set(stop))


def build(rows, vocab=V):
    return SamplingMetadata.build(rows, vocab, "cpu")


def sample(logits, rows):
    return Sampler()(logits, build(rows, logits.shape[-1]))


# ---------------------------------------------------------------- references


def ref_penalties(logits, prompt, output, rep, freq, pres):
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return np.array(out)


def ref_top_k(logits, k):
    if k <= 0 or k >= len(logits):
        return logits.copy()
    kth = sorted(logits, reverse=True)[k - 1]
    return np.where(logits >= kth, logits, NEG_INF)


def ref_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_top_p(logits, p):
    if p >= 1.0:
        return logits.copy()
    probs = ref_softmax(logits)
    keep, total = set(), 0.0
    for t in sorted(range(len(logits)), key=lambda t: -probs[t]):
        if total >= p:
            break
        keep.add(t)
        total += probs[t]
    return np.array([x if t in keep else NEG_INF for t, x in enumerate(logits)])


def ref_min_p(probs, min_p):
    return np.where(probs >= min_p * probs.max(), probs, 0.0)


def ref_distribution(logits, params: SamplingParams):
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    x = ref_top_p(ref_top_k(x, params.top_k), params.top_p)
    probs = ref_min_p(ref_softmax(x), params.min_p)
    return probs / probs.sum()


def ref_log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


# ---------------------------------------------------------------- processors


def test_penalties_match_reference():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    configs = [
        dict(repetition_penalty=1.3, frequency_penalty=0.0, presence_penalty=0.0),
        dict(repetition_penalty=1.0, frequency_penalty=0.7, presence_penalty=0.0),
        dict(repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=-1.5),
        dict(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.1),
        dict(repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0),
    ]
    rows = []
    for cfg in configs:
        prompt = rng.integers(0, V, size=rng.integers(0, 20)).tolist()
        output = rng.integers(0, V, size=rng.integers(0, 30)).tolist()
        rows.append(row(SamplingParams(**cfg), prompt, output))
    logits = torch.randn(len(rows), V) * 3
    got = apply_penalties(logits, build(rows))
    for i, (cfg, r) in enumerate(zip(configs, rows)):
        want = ref_penalties(
            logits[i].tolist(), r.prompt_token_ids, r.output_token_ids,
            cfg["repetition_penalty"], cfg["frequency_penalty"], cfg["presence_penalty"],
        )
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-5, atol=1e-5)


def test_penalty_tensors_only_built_when_used():
    meta = build([row(), row(SamplingParams(temperature=0))])
    assert meta.output_counts is None and meta.prompt_mask is None
    assert meta.repetition_penalties is None and meta.frequency_penalties is None
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.min_tokens_mask is None and meta.max_num_logprobs is None
    meta = build([row(SamplingParams(frequency_penalty=0.5), output=[1, 1, 2])])
    assert meta.prompt_mask is None and meta.repetition_penalties is None
    assert meta.output_counts[0, 1] == 2 and meta.output_counts[0, 2] == 1


@pytest.mark.parametrize("top_p", [None, 0.7])
def test_top_k_matches_reference(top_p):
    torch.manual_seed(1)
    ks = [1, 3, 0, -1, 17, V, 1000]  # 0/-1 disabled, >= V clamped
    logits = torch.randn(len(ks), V)
    meta = build([row(SamplingParams(top_k=k, top_p=top_p or 1.0)) for k in ks])
    got = apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
    for i, k in enumerate(ks):
        want = ref_top_k(logits[i].numpy(), k)
        if top_p is not None:
            want = ref_top_p(want, top_p)
        np.testing.assert_array_equal(np.isinf(got[i].numpy()), np.isinf(want))
        finite = ~np.isinf(want)
        np.testing.assert_array_equal(got[i].numpy()[finite], want[finite])


def test_top_p_matches_reference():
    torch.manual_seed(2)
    ps = [0.05, 0.3, 0.5, 0.9, 0.99, 1.0]
    logits = torch.randn(len(ps), V) * 2
    meta = build([row(SamplingParams(top_p=p)) for p in ps])
    got = apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
    for i, p in enumerate(ps):
        want = ref_top_p(logits[i].numpy(), p)
        np.testing.assert_array_equal(np.isinf(got[i].numpy()), np.isinf(want), err_msg=f"p={p}")
    assert not torch.isinf(got[-1]).any()  # p = 1 keeps everything


def test_min_p_matches_reference():
    torch.manual_seed(3)
    min_ps = [0.0, 0.05, 0.3, 0.9, 1.0]
    probs = torch.randn(len(min_ps), V).mul(2).softmax(-1)
    got = apply_min_p(probs, torch.tensor(min_ps))
    for i, m in enumerate(min_ps):
        want = ref_min_p(probs[i].numpy(), m)
        np.testing.assert_array_equal(got[i].numpy() > 0, want > 0)


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(3, V)
    logits[:, 5] = 10.0  # eos would win
    logits[:, 9] = 5.0
    greedy = SamplingParams(temperature=0, min_tokens=2)
    rows = [
        row(greedy, output=[1], stop={5}),  # 1 < 2: masked
        row(greedy, output=[1, 2], stop={5}),  # reached: not masked
        row(greedy, output=[], stop={5, 9}),  # both banned
    ]
    meta = build(rows)
    assert sample(logits, rows).sampled_token_ids.tolist() == [9, 5, 0]
    masked = apply_penalties(logits, meta)  # mask is applied by the sampler, not penalties
    assert masked[0, 5] == 10.0
    assert sorted(zip(*[t.tolist() for t in meta.min_tokens_mask])) == [(0, 5), (2, 5), (2, 9)]


def test_min_tokens_mask_applies_to_random_rows():
    logits = torch.full((200, 4), -5.0)
    logits[:, 3] = 5.0
    rows = [row(SamplingParams(min_tokens=1), stop={3}) for _ in range(200)]
    assert 3 not in sample(logits, rows).sampled_token_ids.tolist()


# ---------------------------------------------------------------- sampling


def test_greedy_is_exact_argmax_with_lowest_id_on_ties():
    torch.manual_seed(4)
    logits = torch.randn(8, V)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # tie: lowest id wins
    rows = [row(SamplingParams(temperature=0)) for _ in range(8)]
    got = sample(logits, rows).sampled_token_ids
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(-1))
    assert got[3] == 10


def test_greedy_uses_penalised_logits():
    torch.manual_seed(5)
    logits = torch.randn(4, V)
    rows = []
    for i in range(4):
        top = int(logits[i].argmax())
        params = SamplingParams(temperature=0, presence_penalty=2.0, repetition_penalty=1.5)
        rows.append(row(params, [top], [top]))
    got = sample(logits, rows).sampled_token_ids.tolist()
    for i, r in enumerate(rows):
        want = ref_penalties(logits[i].tolist(), r.prompt_token_ids, r.output_token_ids, 1.5, 0.0, 2.0)
        assert got[i] == int(np.argmax(want))


def test_top_k_1_equals_greedy_in_mixed_batch():
    torch.manual_seed(6)
    logits = torch.randn(10, V)
    rows = [row(SamplingParams(temperature=0.9 if i % 2 else 0.0, top_k=1)) for i in range(10)]
    meta = build(rows)
    assert not meta.all_greedy and not meta.all_random
    assert torch.equal(Sampler()(logits, meta).sampled_token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=2.0, min_p=0.15),
        SamplingParams(temperature=1.1, top_k=6, top_p=0.9, min_p=0.05),
    ],
)
def test_sampling_distribution_matches_reference(params):
    torch.manual_seed(7)
    vocab, draws = 8, 40_000
    base = torch.randn(vocab) * 1.5
    logits = base.expand(draws, vocab).clone()
    ids = Sampler()(logits, build([row(params)] * draws, vocab)).sampled_token_ids
    freq = torch.bincount(ids, minlength=vocab).double().numpy() / draws
    want = ref_distribution(base.numpy(), params)
    assert np.all(freq[want == 0] == 0)
    np.testing.assert_allclose(freq, want, atol=0.012)


@pytest.mark.parametrize(
    "seeded_params",
    [SamplingParams(temperature=1.5, top_p=0.95, seed=1234), SamplingParams(temperature=0.8, seed=5)],
)
def test_seeded_row_is_independent_of_batch_and_position(seeded_params):
    torch.manual_seed(8)
    steps = 12
    seeded_logits = torch.randn(steps, V)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, min_p=0.1, logprobs=2),
        SamplingParams(seed=99),
    ]

    def run(batch_others, position):
        generator = torch.Generator().manual_seed(seeded_params.seed)
        generators = {j: torch.Generator().manual_seed(7 + j) for j in range(len(batch_others))}
        outputs, tokens = [[] for _ in batch_others], []
        for s in range(steps):
            rows = [
                SamplingRow(p, [1, 2, 3], outputs[j], generators[j] if p.seed else None, {0})
                for j, p in enumerate(batch_others)
            ]
            rows.insert(position, SamplingRow(seeded_params, [4], list(tokens), generator, {0}))
            logits = torch.randn(len(rows), V) * 2
            logits[position] = seeded_logits[s]
            ids = sample(logits, rows).sampled_token_ids.tolist()
            tokens.append(ids[position])
            for j, t in enumerate(ids[:position] + ids[position + 1 :]):
                outputs[j].append(t)
        return tokens

    alone = run([], 0)
    assert run(others[:2], 0) == alone
    assert run(others, 2) == alone
    assert run(others[2:], 2) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_input_logits_are_not_modified():
    torch.manual_seed(12)
    logits = torch.randn(3, V)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.5,
                            frequency_penalty=1.0, presence_penalty=1.0, min_tokens=4, logprobs=2)
    sample(logits, [row(params, [1, 2], [3, 3], stop={0}) for _ in range(3)])
    assert torch.equal(logits, before)


def test_unseeded_rows_follow_global_rng():
    logits = torch.zeros(4, V)
    rows = [row() for _ in range(4)]
    torch.manual_seed(9)
    a = sample(logits, rows).sampled_token_ids
    torch.manual_seed(9)
    b = sample(logits, rows).sampled_token_ids
    assert torch.equal(a, b)


# ---------------------------------------------------------------- logprobs


def test_logprobs_match_log_softmax_of_raw_logits():
    torch.manual_seed(10)
    asked = [None, 0, 3, 5]
    logits = torch.randn(len(asked), V) * 2
    rows = [
        row(SamplingParams(temperature=0.6, logprobs=k, presence_penalty=1.0, top_k=4), output=[1, 2])
        for k in asked
    ]
    out = sample(logits, rows)
    lp = out.logprobs
    assert lp.token_ids.shape == (4, 6) and lp.logprobs.shape == (4, 6) and lp.ranks.shape == (4,)
    assert lp.token_ids.dtype == torch.int64 and lp.ranks.dtype == torch.int64
    for i in range(len(asked)):
        ref = ref_log_softmax(logits[i].numpy())
        sampled = int(out.sampled_token_ids[i])
        assert lp.token_ids[i, 0] == sampled
        assert lp.logprobs[i, 0].item() == pytest.approx(ref[sampled], abs=1e-5)
        assert lp.ranks[i] == 1 + int((ref > ref[sampled]).sum())
        top = np.argsort(-ref)[:5]
        assert lp.token_ids[i, 1:].tolist() == top.tolist()
        np.testing.assert_allclose(lp.logprobs[i, 1:].numpy(), ref[top], atol=1e-5)


def test_logprobs_whole_vocab_and_none():
    logits = torch.randn(2, 10)
    out = sample(logits, [row(SamplingParams(logprobs=-1)), row(SamplingParams(logprobs=2))])
    assert out.logprobs.token_ids.shape == (2, 11)
    assert sample(logits, [row(), row()]).logprobs is None


def test_greedy_sample_has_rank_1():
    logits = torch.randn(3, V)
    out = sample(logits, [row(SamplingParams(temperature=0, logprobs=1))] * 3)
    assert out.logprobs.ranks.tolist() == [1, 1, 1]
    assert torch.equal(out.logprobs.token_ids[:, 0], out.logprobs.token_ids[:, 1])


@pytest.mark.parametrize("k", [0, 4, -1])
def test_prompt_logprobs(k):
    torch.manual_seed(11)
    n, vocab = 7, 20
    logits = torch.randn(n, vocab) * 3
    targets = torch.randint(0, vocab, (n,))
    out = compute_prompt_logprobs(logits, targets, k)
    width = vocab if k == -1 else k
    assert out.token_ids.shape == (n, width + 1)
    for i in range(n):
        ref = ref_log_softmax(logits[i].numpy())
        t = int(targets[i])
        assert out.token_ids[i, 0] == t
        assert out.logprobs[i, 0].item() == pytest.approx(ref[t], abs=1e-5)
        assert out.ranks[i] == 1 + int((ref > ref[t]).sum())
        top = np.argsort(-ref)[:width]
        np.testing.assert_allclose(out.logprobs[i, 1:].numpy(), ref[top], atol=1e-5)


# ---------------------------------------------------------------- grammar bitmask


def bitmask_allowing(allowed: list[list[int] | None], vocab: int = V) -> RowBitmask:
    """Rows with a token list are constrained to it; None rows are free."""
    mask = allocate_bitmask(len(allowed), vocab)
    for i, tokens in enumerate(allowed):
        if tokens is not None:
            mask[i] = 0
            for t in tokens:
                mask[i, t // 32] |= 1 << (t % 32)
    return RowBitmask([i for i, tokens in enumerate(allowed) if tokens is not None], mask)


def test_grammar_bitmask_constrains_only_its_rows():
    torch.manual_seed(5)
    logits = torch.randn(4, V) * 3
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, logprobs=2), SamplingParams(temperature=1.0, seed=4, logprobs=2)]

    def run(grammar):
        rows = [row(p, seed=p.seed) for p in params]
        return Sampler()(logits.clone(), SamplingMetadata.build(rows, V, "cpu", grammar))  # masked in place

    allowed = [[3, 40], None, [7, 33, 63], None]
    constrained, free = run(bitmask_allowing(allowed)), run(None)
    ids = constrained.sampled_token_ids.tolist()
    assert ids[0] == max(allowed[0], key=lambda t: logits[0, t]) and ids[2] in allowed[2]
    for i in (1, 3):  # free rows: bit-identical to a batch without any grammar
        assert ids[i] == free.sampled_token_ids[i]
        assert torch.equal(constrained.logprobs.logprobs[i], free.logprobs.logprobs[i])
    # logprobs describe the model, not the grammar: the top entries are the raw top tokens
    assert torch.equal(constrained.logprobs.logprobs[0, 1:], free.logprobs.logprobs[0, 1:])


def test_grammar_bitmask_covers_a_vocab_padded_past_32():
    logits = torch.zeros(1, 70)  # 3 words of bits, the last one partly used
    meta = SamplingMetadata.build([row(SamplingParams(temperature=0))], 70, "cpu", bitmask_allowing([[69]], 70))
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [69]


# ---------------------------------------------------------------- logit_bias, allowed_token_ids, bad_words


def test_logit_bias_is_added_per_row_in_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    top = logits.argmax(dim=-1)
    rows = [row(SamplingParams(temperature=0, logit_bias={5: 100.0})),
            row(SamplingParams(temperature=0)),
            row(SamplingParams(temperature=0, logit_bias={int(top[2]): -100.0}, logprobs=2))]
    out = sample(logits.clone(), rows)
    second = logits[2].clone()
    second[top[2]] -= 100.0
    assert out.sampled_token_ids.tolist() == [5, int(top[1]), int(second.argmax())]
    # logprobs describe the model, not the bias (vLLM's default)
    assert torch.allclose(out.logprobs.logprobs[2, 0], torch.log_softmax(logits[2], -1)[second.argmax()])


def test_allowed_token_ids_limit_sampling_to_them():
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    rows = [row(SamplingParams(temperature=1.0, allowed_token_ids=[3, 7]), seed=3), row(SamplingParams(temperature=0))]
    for _ in range(20):
        out = sample(logits.clone(), rows).sampled_token_ids.tolist()
        assert out[0] in (3, 7) and out[1] == int(logits[1].argmax())


def test_bad_words_ban_the_token_that_would_complete_a_word():
    logits = torch.zeros(3, V)
    logits[:, 9] = 5.0  # everyone's favourite next token
    rows = [row(SamplingParams(temperature=0, bad_words=["x"], bad_words_token_ids=[[9]])),  # a one-token word
            row(SamplingParams(temperature=0, bad_words=["x"], bad_words_token_ids=[[4, 9], [11, 12]]), output=[2, 4]),
            row(SamplingParams(temperature=0, bad_words=["x"], bad_words_token_ids=[[4, 9]]), output=[4, 2])]
    out = sample(logits.clone(), rows).sampled_token_ids.tolist()
    assert out[0] != 9 and out[1] != 9 and out[2] == 9  # row 2's output does not end in the word's prefix
