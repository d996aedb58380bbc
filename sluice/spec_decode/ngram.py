"""N-gram (prompt lookup) proposals: the request's own context predicts its next tokens.

If the last n tokens also occur earlier in the context, the tokens that followed that earlier
occurrence are a cheap guess at what follows now: code being rewritten, quotes of the input,
repeated structure. No second model runs. The longest n in [prompt_lookup_min, prompt_lookup_max]
with a match wins, and of its matches the most recent one (the nearest context is the likeliest
to be repeated).
"""

from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: list[int] | np.ndarray) -> list[int]:
        """Up to k draft tokens to follow `token_ids`; [] when no n-gram of the tail recurs."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        last = len(tokens) - 1
        # earlier positions that end a match of the tail, grown one token to the left per round
        ends = np.flatnonzero(tokens[:last] == tokens[last]) if last > 0 else np.empty(0, np.int64)
        best = ends if self.min_n <= 1 else None
        for n in range(2, self.max_n + 1):
            ends = ends[ends >= n - 1]
            ends = ends[tokens[ends - (n - 1)] == tokens[last - (n - 1)]]
            if not len(ends):
                break
            if n >= self.min_n:
                best = ends
        if best is None or not len(best):
            return []
        follow = int(best[-1]) + 1
        return tokens[follow : follow + self.k].tolist()
