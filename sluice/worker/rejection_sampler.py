"""Verifying draft tokens: the target model's own distribution decides what is kept.

A request verifying k drafts d1..dk brings k + 1 logits rows: row j is the target's prediction
after the known tokens and d1..dj. Each row gets every sampling rule of the request as if the
drafts before it were real outputs (penalties, min_tokens, bad words, the grammar's mask). Then,
left to right:

- a greedy row keeps its draft when the draft is the row's argmax;
- a random row keeps draft d with probability min(1, p(d) / q(d)), where q is the proposer's
  distribution; an n-gram proposal is certain (q(d) = 1), so the test is u < p(d);
- the first draft refused ends the request's tokens with a sample from the normalised residual
  max(0, p - q), which for a certain proposal is p without d; if every draft is kept, the last row
  samples one more token from p.

The tokens that come out are distributed exactly as plain sampling from the target would give
them (Leviathan et al. 2023; Chen et al. 2023), and greedy output is the target's greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.worker.sampler import (RowBitmask, Sampler, SamplingMetadata, SamplingRow, gather_logprobs, race,
                                   sampling_probs)


@dataclass
class Verified:
    """Per request, in the order given: its tokens, and their logprobs when it asked for them."""

    token_ids: list[list[int]]
    logprobs: list[list[tuple] | None]


def draft_rows(row: SamplingRow, drafts: list[int]) -> list[SamplingRow]:
    """The sampling rows of one request's k + 1 verification positions."""
    rows = [row]
    for j in range(1, len(drafts) + 1):
        rows.append(SamplingRow(row.params, row.prompt_token_ids, row.output_token_ids + drafts[:j],
                                row.generator, row.stop_token_ids))
    return rows


class RejectionSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, requests: list[tuple[SamplingRow, list[int]]], vocab_size: int,
                 bitmask: RowBitmask | None) -> Verified:
        """logits has len(drafts) + 1 rows per request, requests in order."""
        rows = [r for row, drafts in requests for r in draft_rows(row, drafts)]
        meta = SamplingMetadata.build(rows, vocab_size, logits.device, bitmask)
        processed, raw_logprobs = self.sampler.process(logits, meta)
        drafts_per_row = [d for _, drafts in requests for d in [*drafts, -1]]  # -1: the last row has none
        draft = torch.tensor(drafts_per_row, dtype=torch.int64, device=logits.device)
        has_draft = draft >= 0
        safe_draft = draft.clamp(min=0).unsqueeze(1)

        greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
        target = processed.argmax(dim=-1)
        accepted = greedy & (target == draft)
        chosen = target.clone()
        if not meta.all_greedy:
            probs = sampling_probs(processed, meta)
            total = probs.sum(dim=-1)  # min-p leaves probs unnormalised
            uniform = self._uniform(drafts_per_row, meta.generators, logits.device)
            p_draft = probs.gather(1, safe_draft).squeeze(1) / total
            accepted = torch.where(greedy, accepted, has_draft & (uniform < p_draft))
            residual = probs.scatter(1, safe_draft, 0.0)
            residual = torch.where(has_draft.unsqueeze(1), residual, probs)
            chosen = torch.where(greedy, target, race(residual, meta.generators))

        accepted_list, chosen_list = accepted.tolist(), chosen.tolist()
        tokens_per_request: list[list[int]] = []
        row_tokens = list(chosen_list)  # the token each row contributes (its draft when kept)
        first = 0
        for _, drafts in requests:
            tokens: list[int] = []
            for j, token in enumerate(drafts):
                if not accepted_list[first + j]:
                    break
                tokens.append(token)
                row_tokens[first + j] = token
            tokens.append(chosen_list[first + len(tokens)])
            tokens_per_request.append(tokens)
            first += len(drafts) + 1
        return Verified(tokens_per_request, self._logprobs(raw_logprobs, meta, requests, row_tokens,
                                                           tokens_per_request))

    @staticmethod
    def _uniform(drafts_per_row: list[int], generators: dict[int, torch.Generator], device) -> torch.Tensor:
        """U(0, 1) per row; a seeded request's rows that verify a draft draw from its own generator
        (a row without one draws nothing from it, so it samples exactly as without speculation)."""
        uniform = torch.rand(len(drafts_per_row), device=device)
        for i, generator in generators.items():
            if drafts_per_row[i] >= 0:
                uniform[i] = torch.rand((), generator=generator)
        return uniform

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, meta: SamplingMetadata, requests: list[tuple[SamplingRow, list[int]]],
                  row_tokens: list[int], tokens: list[list[int]]) -> list[list[tuple] | None]:
        """Each kept token's logprob (and top-k) from the row that produced it, as the plain
        sampler reports them: from the raw model distribution."""
        if raw is None:
            return [None] * len(requests)
        lp = gather_logprobs(raw, meta.max_num_logprobs,
                             torch.tensor(row_tokens, dtype=torch.int64, device=raw.device))
        ids, values, ranks = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
        out: list[list[tuple] | None] = []
        first = 0
        for (row, drafts), kept in zip(requests, tokens):
            k = row.params.logprobs
            if k is None:
                out.append(None)
            else:
                k = lp.token_ids.shape[1] - 1 if k < 0 else k
                out.append([(ids[r][: k + 1], values[r][: k + 1], ranks[r])
                            for r in range(first, first + len(kept))])
            first += len(drafts) + 1
        return out
