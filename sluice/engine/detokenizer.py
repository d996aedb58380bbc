"""Incremental detokenization and stop-string matching, one instance per sequence.

Token-by-token decoding is not `decode(ids[i])` concatenated: byte-level and
byte-fallback tokenizers split one character over several tokens, and
sentencepiece-style decoders drop a leading space at the start of a string.
The fast path keeps a `tokenizers.decoders.DecodeStream` primed with the tail
of the prompt; the fallback keeps the classic prefix/read offsets over
`convert_ids_to_tokens` / `convert_tokens_to_string`. Both hold back text
while it ends in an incomplete UTF-8 sequence (U+FFFD).
"""

from __future__ import annotations

from sluice.sampling_params import SamplingParams

try:
    from tokenizers import Tokenizer as _BackendTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a hard dependency in practice
    _BackendTokenizer = None
    DecodeStream = None

_REPLACEMENT = "\ufffd"
# Prompt tokens used to prime decoding, so the first output token decodes in context.
_PRIME_TOKENS = 4
# How far further back to look for a prompt suffix that starts on a character boundary.
_MAX_PRIME_TOKENS = 16


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.output_text = ""
        self.stop = list(params.stop or [])
        # Characters that might be the start of a stop string are held back
        # from streams; with include_stop_str_in_output nothing needs hiding.
        longest = max((len(s) for s in self.stop), default=0)
        self._hold_back = 0 if params.include_stop_str_in_output else max(longest - 1, 0)
        self._streamed = 0  # offset of output_text already returned by delta streaming
        self._backend = _backend_of(tokenizer)
        if self._backend is not None and DecodeStream is not None:
            self._decoder = _StreamDecoder(self._backend, params, prompt_token_ids)
        else:
            self._decoder = _OffsetDecoder(tokenizer, params, prompt_token_ids)

    def update(self, new_token_ids: list[int], num_output_tokens: int, stop_terminated: bool = False) -> str | None:
        """Append new tokens' text; if a stop string matched (only once num_output_tokens >=
        params.min_tokens), truncate output_text at it (keep it when include_stop_str_in_output)
        and return that stop string; else None. stop_terminated: the last token stopped the
        request (EOS or a stop_token_ids entry); its text is output only with
        include_stop_str_in_output, as in vLLM."""
        if stop_terminated and not self.params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        new_text = "".join(self._decoder.step(t) for t in new_token_ids)
        if not new_text:
            return None
        old_len = len(self.output_text)
        self.output_text += new_text
        if not self.stop or num_output_tokens < self.params.min_tokens:
            return None
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        """Find the earliest stop string that ends inside the new text (ties: list order)."""
        best_start, best = -1, None
        for s in self.stop:
            start = self.output_text.find(s, max(old_len - len(s) + 1, 0))
            if start != -1 and (best is None or start < best_start):
                best_start, best = start, s
        if best is None:
            return None
        end = best_start + len(best) if self.params.include_stop_str_in_output else best_start
        self.output_text = self.output_text[:end]
        return best

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text for streaming: while not finished, hold back the last len(longest stop
        string)-1 characters (they may be the start of a stop string), so a stop string
        never leaks into a stream; delta=True returns only what is new since the last call."""
        end = len(self.output_text) if finished else max(len(self.output_text) - self._hold_back, 0)
        if not delta:
            return self.output_text[:end]
        if end <= self._streamed:
            return ""
        text = self.output_text[self._streamed : end]
        self._streamed = end
        return text

    def decode_token(self, token_id: int) -> str:
        """A single token's text, for logprobs' decoded_token (special tokens included)."""
        if self._backend is not None:
            return self._backend.decode([token_id], skip_special_tokens=False)
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast HF tokenizer, or None."""
    if _BackendTokenizer is None:
        return None
    if isinstance(tokenizer, _BackendTokenizer):
        return tokenizer
    for attr in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attr, None)
        if isinstance(backend, _BackendTokenizer):
            return backend
    return None


class _StreamDecoder:
    """Fast path: the tokenizers library's DecodeStream (Rust, handles byte fallback)."""

    def __init__(self, backend, params: SamplingParams, prompt_token_ids: list[int]):
        self._backend = backend
        self._skip_special = params.skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=self._skip_special)
        for token_id in self._priming_ids(prompt_token_ids):
            self._stream.step(backend, token_id)

    def _priming_ids(self, prompt_token_ids: list[int]) -> list[int]:
        """A short prompt suffix that starts on a character boundary."""
        n = len(prompt_token_ids)
        for size in range(min(_PRIME_TOKENS, n), min(_MAX_PRIME_TOKENS, n) + 1):
            suffix = prompt_token_ids[n - size :]
            text = self._backend.decode(suffix, skip_special_tokens=self._skip_special)
            if not text.startswith(_REPLACEMENT):
                return suffix
        return []

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


class _OffsetDecoder:
    """Fallback: re-decode a short window of tokens and emit what grew past the prefix."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._spaces_between_special = params.spaces_between_special_tokens
        self._special = set(getattr(tokenizer, "all_special_tokens", []))
        self._added = set(getattr(tokenizer, "get_added_vocab", dict)())
        self._tokens: list[str] = self._to_tokens(prompt_token_ids[-_MAX_PRIME_TOKENS:])
        self._prefix_offset, self._read_offset = self._initial_offsets()

    def _initial_offsets(self) -> tuple[int, int]:
        """Start the window on a character boundary, and leave an incomplete
        character at the prompt's end unread so the output can complete it."""
        prefix = max(len(self._tokens) - _PRIME_TOKENS, 0)
        while prefix > 0 and self._to_string(self._tokens[prefix:]).startswith(_REPLACEMENT):
            prefix -= 1
        read = len(self._tokens)
        while read > prefix and self._to_string(self._tokens[prefix:read]).endswith(_REPLACEMENT):
            read -= 1
        return prefix, read

    def _to_tokens(self, ids: list[int]) -> list[str]:
        tokens = self._tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=self._skip_special)
        return [t for t in tokens if t is not None]

    def _to_string(self, tokens: list[str]) -> str:
        """convert_tokens_to_string, but added tokens stay literal, as in decode()."""
        if not self._added:
            return self._tokenizer.convert_tokens_to_string(tokens)
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added:
                if run:
                    parts.append(self._tokenizer.convert_tokens_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self._tokenizer.convert_tokens_to_string(run))
        return (" " if self._spaces_between_special else "").join(parts)

    def step(self, token_id: int) -> str:
        self._tokens.extend(self._to_tokens([token_id]))
        prefix = self._to_string(self._tokens[self._prefix_offset : self._read_offset])
        text = self._to_string(self._tokens[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or an incomplete multi-byte character
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return text[len(prefix) :]
