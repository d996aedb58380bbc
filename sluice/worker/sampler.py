"""Batched token sampling on device tensors.

Each step the model runner collects one `SamplingRow` per request that samples
a token, builds a `SamplingMetadata` once, and calls `Sampler()(logits, meta)`.
Everything is vectorised over the batch and nothing forces a host sync; the
only Python loop at sample time draws noise for seeded rows.

Order (vLLM's): logprobs from the raw logits -> the grammar bitmask of
structured-output rows -> allowed_token_ids -> bad_words -> min_tokens masking
of stop ids -> logit_bias -> repetition/
frequency/presence penalties -> greedy rows take argmax -> random rows:
temperature, top-k, top-p, min-p, softmax, then the exponential race
argmax(probs / q), q ~ Exp(1), which samples from probs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.layers import native
from sluice.sampling_params import SamplingParams
from sluice.structured_output.backend import apply_bitmask

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, not including the one being sampled
    generator: torch.Generator | None  # per-request generator for seeded requests
    stop_token_ids: set[int]  # masked out while len(output_token_ids) < params.min_tokens


@dataclass
class RowBitmask:
    """Allowed tokens per sampling row; only `rows` are constrained (the rest allow everything)."""

    rows: list[int]
    bitmask: torch.Tensor  # [num sampling rows, ceil(vocab_size / 32)] int32


@dataclass
class SamplingMetadata:
    """Per-step batch tensors; a feature's tensors are None when no row uses it."""

    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # [B] bool; only for mixed batches
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V means disabled
    max_top_k: int  # largest enabled top_k (0 when none)
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    generators: dict[int, torch.Generator]  # row index -> generator, random rows only
    output_counts: torch.Tensor | None  # [B, V] float32 token counts over outputs
    prompt_mask: torch.Tensor | None  # [B, V] bool: token occurs in the prompt
    repetition_penalties: torch.Tensor | None  # [B] float32
    frequency_penalties: torch.Tensor | None  # [B] float32
    presence_penalties: torch.Tensor | None  # [B] float32
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # (row ids, token ids) to ban
    max_num_logprobs: int | None  # k for sample logprobs; None when no row asks
    grammar: RowBitmask | None = None  # allowed tokens of grammar-constrained rows
    disallowed: torch.Tensor | None = None  # [B, V] bool: outside a row's allowed_token_ids
    bad_words_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (row ids, token ids) to ban
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, tokens, bias)

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device,
              grammar: RowBitmask | None = None) -> SamplingMetadata:
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)

        def vec(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        top_ks = [_effective_top_k(p.top_k, vocab_size) for p in params]
        enabled_ks = [k for k in top_ks if k < vocab_size]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        reps = [p.repetition_penalty for p in params]
        freqs = [p.frequency_penalty for p in params]
        press = [p.presence_penalty for p in params]

        use_rep = any(r != 1.0 for r in reps)
        use_freq = any(f != 0.0 for f in freqs)
        use_pres = any(p != 0.0 for p in press)
        output_counts = prompt_mask = None
        if use_rep or use_freq or use_pres:
            output_counts = _token_counts([r.output_token_ids for r in rows], vocab_size, device)
        if use_rep:
            prompt_mask = _token_counts([r.prompt_token_ids for r in rows], vocab_size, device) > 0

        return cls(
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if all_greedy or all_random else vec(greedy, torch.bool),
            temperature=None if all(t == 1.0 for t in temps) else vec(temps, torch.float32),
            top_k=vec(top_ks, torch.int64) if enabled_ks else None,
            max_top_k=max(enabled_ks, default=0),
            top_p=vec(top_ps, torch.float32) if any(p < 1.0 for p in top_ps) else None,
            min_p=vec(min_ps, torch.float32) if any(p > 0.0 for p in min_ps) else None,
            generators={
                i: r.generator
                for i, r in enumerate(rows)
                if r.generator is not None and not greedy[i]
            },
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            repetition_penalties=vec(reps, torch.float32) if use_rep else None,
            frequency_penalties=vec(freqs, torch.float32) if use_freq else None,
            presence_penalties=vec(press, torch.float32) if use_pres else None,
            min_tokens_mask=_min_tokens_mask(rows, vocab_size, vec),
            max_num_logprobs=_max_num_logprobs(params, vocab_size),
            grammar=grammar,
            disallowed=_disallowed(params, vocab_size, device),
            bad_words_mask=_bad_words_mask(rows, vec),
            logit_bias=_logit_bias(params, vec),
        )

    def changes_logits(self) -> bool:
        """Whether any row's logits are processed before sampling (else greedy is a bare argmax)."""
        return (self.min_tokens_mask is not None or self.grammar is not None or _has_penalties(self)
                or self.disallowed is not None or self.bad_words_mask is not None or self.logit_bias is not None)


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # [B, k+1] int64: the sampled (or target) token, then the top-k
    logprobs: torch.Tensor  # [B, k+1] float32
    ranks: torch.Tensor  # [B] int64: rank of the sampled token (1 = most likely)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None  # k = max requested over rows; rows slice what they asked


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Samples one token per row. With a grammar bitmask, float32 `logits` are masked in place
        (the runner's logits serve this step only; a copy would cost a [B, V] write per step)."""
        if meta.all_greedy and meta.max_num_logprobs is None and not meta.changes_logits():
            # nothing to process: argmax alone, natively on bf16 logits where it can (PyTorch's
            # float32 argmax is ~2x faster than its bf16 one, even counting the copy)
            sampled = native.argmax(logits)
            return SamplerOutput(sampled_token_ids=logits.float().argmax(dim=-1) if sampled is None else sampled,
                                 logprobs=None)
        logits, logprobs = self.process(logits, meta)
        greedy_ids = None if meta.all_random else logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy_ids
        elif meta.all_random:
            sampled = _sample_random(logits, meta)
        else:
            sampled = torch.where(meta.greedy_mask, greedy_ids, _sample_random(logits, meta))

        out_logprobs = None
        if logprobs is not None:
            out_logprobs = gather_logprobs(logprobs, meta.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=out_logprobs)

    @staticmethod
    def process(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 logits with every row's rules applied (greedy rows take their argmax), and the
        raw logprobs when a row asks for logprobs."""
        logits = logits.float()
        logprobs = None
        if meta.max_num_logprobs is not None:
            # vLLM V1's default: logprobs describe the model, not the sampling rules.
            logprobs = torch.log_softmax(logits, dim=-1)

        if meta.grammar is not None:
            apply_bitmask(logits, meta.grammar.bitmask, meta.grammar.rows)
        if meta.disallowed is not None:
            logits = logits.masked_fill(meta.disallowed, _NEG_INF)
        if meta.bad_words_mask is not None:
            logits = logits.index_put(meta.bad_words_mask, logits.new_tensor(_NEG_INF))
        if meta.min_tokens_mask is not None:
            logits = logits.index_put(meta.min_tokens_mask, logits.new_tensor(_NEG_INF))
        if meta.logit_bias is not None:
            rows, tokens, bias = meta.logit_bias
            logits = logits.index_put((rows, tokens), bias, accumulate=True)
        return apply_penalties(logits, meta), logprobs


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Logprobs of the actual next prompt tokens ([N] targets for [N, V] logits), plus top-k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    k = logits.shape[-1] if num_logprobs == -1 else min(num_logprobs, logits.shape[-1])
    return gather_logprobs(logprobs, k, target_ids)


# ---------------------------------------------------------------- processors


def _has_penalties(meta: SamplingMetadata) -> bool:
    return (meta.repetition_penalties is not None or meta.frequency_penalties is not None
            or meta.presence_penalties is not None)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt+output), then frequency and presence (output only), as in vLLM."""
    if meta.repetition_penalties is not None:
        seen = meta.prompt_mask | (meta.output_counts > 0)
        r = meta.repetition_penalties.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if meta.frequency_penalties is not None:
        logits = logits - meta.frequency_penalties.unsqueeze(1) * meta.output_counts
    if meta.presence_penalties is not None:
        present = (meta.output_counts > 0).float()
        logits = logits - meta.presence_penalties.unsqueeze(1) * present
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Ban tokens outside each row's top-k, then outside its top-p nucleus.

    Top-k keeps every token whose logit is >= the k-th largest (ties kept).
    Top-p keeps the smallest prefix of the sorted distribution (renormalised
    over the top-k survivors) whose mass reaches p.
    """
    vocab_size = logits.shape[-1]
    if top_p is None:
        if top_k is None:
            return logits
        # A partial top-k over the largest enabled k is cheaper than a full sort.
        disabled = top_k >= vocab_size
        kth_index = (top_k.clamp(max=max_top_k) - 1).unsqueeze(1)
        kth = logits.topk(max_top_k, dim=-1).values.gather(1, kth_index)
        kth = kth.masked_fill(disabled.unsqueeze(1), _NEG_INF)
        return logits.masked_fill(logits < kth, _NEG_INF)

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # A token is dropped once the tokens ranked above it already reach top_p.
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    drop[:, 1:] = cum[:, :-1] >= top_p.unsqueeze(1)
    drop &= (top_p < 1.0).unsqueeze(1)  # float error in cum must not cut p=1 rows
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens whose probability is below min_p times the row's top probability."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)


# ---------------------------------------------------------------- sampling


def sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution random rows sample from: temperature, top-k, top-p, softmax, min-p.
    min-p leaves it unnormalised; every consumer here only compares or races its entries."""
    if meta.temperature is not None:
        logits = logits / meta.temperature.unsqueeze(1)
    logits = apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
    probs = logits.softmax(dim=-1)
    if meta.min_p is not None:
        probs = apply_min_p(probs, meta.min_p)
    return probs


def race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row drawn in proportion to `probs` (unnormalised is fine):
    argmax(p_i / q_i) with q_i ~ Exp(1) picks i with probability p_i / sum(p), so neither
    renormalisation nor multinomial (which syncs) is needed."""
    q = torch.empty_like(probs)
    if len(generators) < q.shape[0]:
        q.exponential_()
    for i, generator in generators.items():
        # Seeded rows draw only from their own generator, so their samples do
        # not depend on the batch they land in.
        q[i].exponential_(generator=generator)
    q.clamp_(min=torch.finfo(q.dtype).tiny)  # q == 0 would give inf or nan
    return probs.div(q).argmax(dim=-1)


def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    return race(sampling_probs(logits, meta), meta.generators)


def gather_logprobs(logprobs: torch.Tensor, k: int, token_ids: torch.Tensor) -> LogprobsTensors:
    token_ids = token_ids.long().unsqueeze(1)
    token_logprobs = logprobs.gather(1, token_ids)
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    if k > 0:
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)
        token_ids = torch.cat([token_ids, top_ids], dim=1)
        token_logprobs = torch.cat([token_logprobs, top_logprobs], dim=1)
    return LogprobsTensors(token_ids=token_ids, logprobs=token_logprobs, ranks=ranks)


# ---------------------------------------------------------------- metadata helpers


def _effective_top_k(top_k: int, vocab_size: int) -> int:
    return vocab_size if top_k <= 0 else min(top_k, vocab_size)


def _max_num_logprobs(params: list[SamplingParams], vocab_size: int) -> int | None:
    asked = [p.logprobs for p in params if p.logprobs is not None]
    if not asked:
        return None
    return vocab_size if -1 in asked else min(max(asked), vocab_size)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[B, V] float32 occurrence counts; ids outside the vocab are ignored."""
    width = max((len(ids) for ids in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    padded = [ids + [vocab_size] * (width - len(ids)) for ids in token_lists]
    index = torch.tensor(padded, dtype=torch.int64).to(device, non_blocking=True)
    index = index.masked_fill((index < 0) | (index > vocab_size), vocab_size)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _min_tokens_mask(
    rows: list[SamplingRow], vocab_size: int, vec
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, token) pairs of stop ids to ban for rows still short of min_tokens."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            for t in row.stop_token_ids:
                if 0 <= t < vocab_size:
                    row_ids.append(i)
                    token_ids.append(t)
    if not row_ids:
        return None
    return vec(row_ids, torch.int64), vec(token_ids, torch.int64)


def _disallowed(params: list[SamplingParams], vocab_size: int, device) -> torch.Tensor | None:
    """[B, V] True outside each row's allowed_token_ids (rows without the option allow all)."""
    if all(p.allowed_token_ids is None for p in params):
        return None
    mask = torch.zeros(len(params), vocab_size, dtype=torch.bool)
    for i, p in enumerate(params):
        if p.allowed_token_ids is not None:
            mask[i] = True
            mask[i, p.allowed_token_ids] = False
    return mask.to(device, non_blocking=True)


def _bad_words_mask(rows: list[SamplingRow], vec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, token) pairs that would complete a bad word: a word's last token is banned when the
    output so far ends with the word's other tokens (a one-token word is always banned)."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, row in enumerate(rows):
        output = row.output_token_ids
        for word in row.params.bad_words_token_ids or ():
            prefix = word[:-1]
            if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
                row_ids.append(i)
                token_ids.append(word[-1])
    if not row_ids:
        return None
    return vec(row_ids, torch.int64), vec(token_ids, torch.int64)


def _logit_bias(params: list[SamplingParams], vec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Every row's logit_bias as one scatter-add: (row ids, token ids, biases)."""
    entries = [(i, token, bias) for i, p in enumerate(params) for token, bias in (p.logit_bias or {}).items()]
    if not entries:
        return None
    rows, tokens, biases = zip(*entries)
    return vec(list(rows), torch.int64), vec(list(tokens), torch.int64), vec(list(biases), torch.float32)
