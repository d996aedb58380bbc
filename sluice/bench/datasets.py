"""What a benchmark sends: the four datasets, as lists of prompts with the output length each asks for.

- random: seeded random token ids turned into text that re-tokenizes to exactly the drawn length
  (decode, re-encode, trim or top up, repeat), so "1024 tokens in" means 1024 on the server too;
- prefix-repetition: N shared random prefixes, each request one prefix plus a unique suffix,
  to measure prefix caching;
- sharegpt: a ShareGPT-format JSON file, first human turn as prompt, first reply's length as output;
- custom: a JSONL file of {"prompt": ..., "output_len": ...}, taken in file order.

Flag names follow `vllm bench serve`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np

DATASETS = ("random", "prefix-repetition", "sharegpt", "custom")
# ShareGPT entries outside these bounds are skipped, as vLLM's benchmark does, so that runs stay comparable.
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT_LEN, SHAREGPT_MAX_TOTAL_LEN = 4, 1024, 2048
_MAX_ROUNDS = 10


class DatasetError(ValueError):
    """A dataset flag or file that cannot be used; the message names the flag or the file and line."""


@dataclass(slots=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # the prompt's token count with the benchmark's tokenizer (no special tokens added)
    output_len: int  # the max_tokens to ask for
    prompt_ids: list[int] | None = None  # the prompt's token ids, for in-process runs
    prefix_index: int | None = None  # prefix-repetition: which shared prefix this prompt starts with


# ---- flags -----------------------------------------------------------------------------------------
def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", default="random", choices=DATASETS, help="where prompts come from")
    group.add_argument("--dataset-path", default=None, metavar="PATH",
                       help="sharegpt: a ShareGPT JSON file; custom: a JSONL file")
    group.add_argument("--num-prompts", type=int, default=1000, metavar="N", help="requests to send (per sweep level)")
    group.add_argument("--random-input-len", "--input-len", dest="random_input_len", type=int, default=1024,
                       metavar="N",
                       help="random: prompt tokens")
    group.add_argument("--random-output-len", "--output-len", dest="random_output_len", type=int, default=128,
                       metavar="N",
                       help="random: output tokens to ask for")
    group.add_argument("--random-prefix-len", type=int, default=0, metavar="N",
                       help="random: tokens of one random prefix every prompt starts with (before its "
                            "--random-input-len tokens)")
    group.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                       help="random: lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1")
    group.add_argument("--prefix-repetition-prefix-len", type=int, default=256, metavar="N",
                       help="tokens of each shared prefix")
    group.add_argument("--prefix-repetition-suffix-len", type=int, default=256, metavar="N",
                       help="tokens of each unique suffix")
    group.add_argument("--prefix-repetition-num-prefixes", type=int, default=10, metavar="N",
                       help="distinct shared prefixes")
    group.add_argument("--prefix-repetition-output-len", type=int, default=128, metavar="N",
                       help="output tokens to ask for")
    group.add_argument("--sharegpt-output-len", type=int, default=None, metavar="N",
                       help="sharegpt: ask for this many output tokens instead of the reply's length")
    group.add_argument("--custom-output-len", type=int, default=256, metavar="N",
                       help="custom: output tokens for lines without an output_len")


def check_dataset_args(args: argparse.Namespace) -> str | None:
    """The first problem with the dataset flags, as a message naming the flag and its limit."""
    at_least_one = ["num_prompts", "random_input_len", "random_output_len", "prefix_repetition_prefix_len",
                    "prefix_repetition_suffix_len", "prefix_repetition_num_prefixes",
                    "prefix_repetition_output_len", "custom_output_len"]
    if args.sharegpt_output_len is not None:
        at_least_one.append("sharegpt_output_len")
    for name in at_least_one:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.random_prefix_len < 0:
        return f"--random-prefix-len must be >= 0, got {args.random_prefix_len}"
    if not 0 <= args.random_range_ratio < 1:
        return f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}"
    if args.dataset_name in ("sharegpt", "custom"):
        if not args.dataset_path:
            return f"--dataset-path is required with --dataset-name {args.dataset_name}"
        if not os.path.isfile(args.dataset_path):
            return f"--dataset-path {args.dataset_path}: file not found"
    return None


def build_requests(args: argparse.Namespace, tokenizer, seed: int) -> list[BenchRequest]:
    """The dataset the flags describe, `args.num_prompts` requests long."""
    name, n = args.dataset_name, args.num_prompts
    if name == "random":
        return random_requests(tokenizer, n, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, seed, args.random_prefix_len)
    if name == "prefix-repetition":
        return prefix_repetition_requests(
            tokenizer, n, args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes, args.prefix_repetition_output_len, seed)
    if name == "sharegpt":
        return sharegpt_requests(tokenizer, args.dataset_path, n, seed, args.sharegpt_output_len)
    return custom_requests(tokenizer, args.dataset_path, n, args.custom_output_len)


# ---- random token ids ---------------------------------------------------------------------------------
def _ordinary_ids(tokenizer) -> tuple[int, np.ndarray]:
    """Vocabulary size and the special ids a random prompt must not contain."""
    return len(tokenizer), np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)


def _draw(rng: np.random.Generator, shape, vocab: int, special: np.ndarray) -> np.ndarray:
    ids = rng.integers(0, vocab, size=shape)
    while (bad := np.isin(ids, special)).any():
        ids[bad] = rng.integers(0, vocab, size=int(bad.sum()))
    return ids


def random_token_ids(tokenizer, num: int, length: int, seed: int) -> list[list[int]]:
    """Seeded random token ids in [0, vocab), no special tokens: prompts passed to an engine as ids."""
    vocab, special = _ordinary_ids(tokenizer)
    return _draw(np.random.default_rng(seed), (num, length), vocab, special).tolist()


def exact_length_text(tokenizer, ids: list[int], target: int, rng: np.random.Generator) -> tuple[str, list[int]]:
    """Text that re-tokenizes to `target` ids. Decoding then encoding random ids merges or splits
    some of them, so trim or top up with fresh draws and try again; after a few rounds keep the
    closest text (its true length is what the caller records)."""
    vocab, special = _ordinary_ids(tokenizer)
    for _ in range(_MAX_ROUNDS):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == target:
            return text, ids
        ids = ids[:target] if len(ids) > target else ids + _draw(rng, target - len(ids), vocab, special).tolist()
    text = tokenizer.decode(ids)
    return text, tokenizer.encode(text, add_special_tokens=False)


def sample_lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> list[int]:
    """n lengths uniform in [length*(1-ratio), length*(1+ratio)], never below 1."""
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def random_requests(tokenizer, num: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int, prefix_len: int = 0) -> list[BenchRequest]:
    """With prefix_len, every prompt starts with the same random prefix (vLLM's --random-prefix-len);
    prompt_len counts the whole prompt as the tokenizer sees it."""
    rng = np.random.default_rng(seed)
    vocab, special = _ordinary_ids(tokenizer)
    prefix = exact_length_text(tokenizer, _draw(rng, prefix_len, vocab, special).tolist(), prefix_len, rng)[0] \
        if prefix_len else ""
    input_lens = sample_lengths(rng, input_len, range_ratio, num)
    output_lens = sample_lengths(rng, output_len, range_ratio, num)
    requests = []
    for in_len, out_len in zip(input_lens, output_lens):
        text, ids = exact_length_text(tokenizer, _draw(rng, in_len, vocab, special).tolist(), in_len, rng)
        if prefix:
            text = prefix + text
            ids = tokenizer.encode(text, add_special_tokens=False)
        requests.append(BenchRequest(text, len(ids), out_len, ids))
    return requests


def prefix_repetition_requests(tokenizer, num: int, prefix_len: int, suffix_len: int, num_prefixes: int,
                               output_len: int, seed: int) -> list[BenchRequest]:
    """Request i starts with prefix i % num_prefixes; the order is shuffled so that requests sharing a
    prefix do not arrive back to back."""
    rng = np.random.default_rng(seed)
    vocab, special = _ordinary_ids(tokenizer)

    def random_text(length: int) -> str:
        return exact_length_text(tokenizer, _draw(rng, length, vocab, special).tolist(), length, rng)[0]

    prefixes = [random_text(prefix_len) for _ in range(num_prefixes)]
    requests = []
    for i in range(num):
        prompt = prefixes[i % num_prefixes] + random_text(suffix_len)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        requests.append(BenchRequest(prompt, len(ids), output_len, ids, prefix_index=i % num_prefixes))
    order = rng.permutation(num)
    return [requests[i] for i in order]


# ---- files -------------------------------------------------------------------------------------------------
def _cycled(requests: list[BenchRequest], num: int, source: str) -> list[BenchRequest]:
    """Exactly `num` requests: the first ones, or all of them repeated when the file has fewer."""
    if not requests:
        raise DatasetError(f"--dataset-path {source}: no usable entries")
    if len(requests) < num:
        print(f"note: {source} has {len(requests)} usable entries for --num-prompts {num}; repeating them")
    return [requests[i % len(requests)] for i in range(num)]


def sharegpt_requests(tokenizer, path: str, num: int, seed: int, output_len: int | None = None) -> list[BenchRequest]:
    """Conversations shuffled with the seed; each gives its first turn as the prompt and, unless
    `output_len` is fixed, the first reply's token count as the output length."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"--dataset-path {path}: not a ShareGPT JSON file ({e})") from e
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list of conversations")
    rng = np.random.default_rng(seed)
    requests = []
    for i in rng.permutation(len(data)):
        entry = data[i] if isinstance(data[i], dict) else {}
        turns = entry.get("conversations") or entry.get("conversation")
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue
        prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        out_len = output_len or len(tokenizer.encode(reply, add_special_tokens=False))
        if output_len is None and not _sharegpt_lengths_ok(len(ids), out_len):
            continue
        requests.append(BenchRequest(prompt, len(ids), out_len, ids))
        if len(requests) == num:
            break
    return _cycled(requests, num, path)


def _sharegpt_lengths_ok(prompt_len: int, output_len: int) -> bool:
    return (prompt_len >= SHAREGPT_MIN_LEN and output_len >= SHAREGPT_MIN_LEN
            and prompt_len <= SHAREGPT_MAX_PROMPT_LEN and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_LEN)


def custom_requests(tokenizer, path: str, num: int, default_output_len: int) -> list[BenchRequest]:
    """JSONL lines {"prompt": str, "output_len": int (optional)}, in file order."""
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{path}:{lineno}: not JSON ({e})") from e
            prompt = entry.get("prompt") if isinstance(entry, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise DatasetError(f"{path}:{lineno}: needs a non-empty string 'prompt'")
            out_len = entry.get("output_len", default_output_len)
            if isinstance(out_len, bool) or not isinstance(out_len, int) or out_len < 1:
                raise DatasetError(f"{path}:{lineno}: 'output_len' must be an integer >= 1, got {out_len!r}")
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            requests.append(BenchRequest(prompt, len(ids), out_len, ids))
            if len(requests) == num:
                break
    return _cycled(requests, num, path)
