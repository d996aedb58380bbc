"""Grammar state of the engine's requests, for the scheduler.

A constrained request waits while its grammar compiles (other requests keep running), then a
matcher follows its output: each step the matcher fills the request's row of the batch's token
bitmask, and each sampled token advances it. Output tokens are accepted once, when sampled, so
a request preempted and recomputed keeps its matcher exactly where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait

import torch
import xgrammar as xgr

from sluice.config import StructuredOutputsConfig
from sluice.sampling_params import SamplingParams
from sluice.structured_output.backend import Compiled, GrammarCompiler, allocate_bitmask, describe_error


class GrammarError(Exception):
    """A request's grammar failed to compile, or did not compile in time."""


class RequestGrammar:
    """One request's grammar: a compilation future, then a matcher over its output tokens."""

    def __init__(self, future: Future[Compiled], field: str, stop_token_ids: list[int], timeout: float) -> None:
        self.future = future
        self.field = field  # names the spec in errors
        self.stop_token_ids = stop_token_ids
        self.timeout = timeout
        self.started = time.monotonic()
        self.matcher: xgr.GrammarMatcher | None = None

    def ready(self) -> bool:
        """Whether the grammar is compiled; raises GrammarError if compiling failed or took longer
        than the timeout (judged by when it finished, so a slow compile fails however late we look)."""
        if self.matcher is not None:
            return True
        if not self.future.done():
            if time.monotonic() - self.started > self.timeout:
                raise self._timed_out()
            return False
        try:
            compiled, finished_at = self.future.result()
        except Exception as exc:
            raise GrammarError(f"{self.field}: the grammar failed to compile: {describe_error(exc)}") from exc
        if finished_at - self.started > self.timeout:
            raise self._timed_out()
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None)
        return True

    def _timed_out(self) -> GrammarError:
        return GrammarError(f"{self.field}: the grammar did not compile within {self.timeout:g} s "
                            "(--structured-outputs-compile-timeout)")

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing may follow."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def fill_with_drafts(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
        """Rows row .. row + len(drafts): what may come next now, and after each draft in turn.
        The matcher steps through the drafts and is rolled back: only verified tokens advance it."""
        for i, token in enumerate(drafts):
            self.fill(bitmask, row + i)
            if not self.accept(token):
                raise RuntimeError(f"draft token {token} passed the grammar when proposed and fails it now")
        self.fill(bitmask, row + len(drafts))
        if drafts:
            self.matcher.rollback(len(drafts))

    def valid_prefix(self, drafts: list[int]) -> list[int]:
        """The longest prefix of `drafts` the grammar accepts from here (the matcher is left as it was)."""
        accepted = 0
        for token in drafts:
            if self.matcher.is_terminated() or not self.accept(token):
                break
            accepted += 1
        if accepted:
            self.matcher.rollback(accepted)
        return drafts[:accepted]


class StructuredOutputManager:
    def __init__(self, config: StructuredOutputsConfig, load_tokenizer: Callable[[], object], vocab_size: int) -> None:
        self.timeout = config.structured_outputs_compile_timeout
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(load_tokenizer, vocab_size, config.structured_outputs_any_whitespace)
        self.num_active = 0  # requests holding a grammar

    def start(self, params: SamplingParams, eos_token_ids: tuple[int, ...]) -> RequestGrammar:
        """Start compiling (or reuse) a request's grammar."""
        spec = params.structured_outputs
        # The grammar ends on the model's EOS or a requested stop id, even with ignore_eos.
        stop_ids = sorted(set(eos_token_ids) | set(params.stop_token_ids or ()))
        self.num_active += 1
        return RequestGrammar(self.compiler.submit(spec.spec()), spec.field_name(), stop_ids, self.timeout)

    def release(self) -> None:
        """A request holding a grammar finished."""
        self.num_active -= 1

    def fill_bitmask(self, grammars: list[tuple[RequestGrammar, list[int]]]) -> torch.Tensor:
        """[rows, ceil(vocab_size / 32)] int32 for (grammar, drafts) pairs: len(drafts) + 1 rows
        each, in order, holding the tokens the grammar allows at each position to verify."""
        bitmask = allocate_bitmask(sum(len(drafts) + 1 for _, drafts in grammars), self.vocab_size)
        row = 0
        for grammar, drafts in grammars:
            grammar.fill_with_drafts(bitmask, row, drafts)
            row += len(drafts) + 1
        return bitmask

    @staticmethod
    def wait(grammars: list[RequestGrammar], timeout: float) -> None:
        """Block up to `timeout` s until one of these grammars compiles (when nothing else can run)."""
        wait([g.future for g in grammars], timeout, return_when=FIRST_COMPLETED)
