"""The four datasets: exact random lengths, shared prefixes, ShareGPT and JSONL parsing."""

from __future__ import annotations

import json
import os

import pytest

from sluice.bench.datasets import (
    DatasetError, custom_requests, prefix_repetition_requests, random_requests, random_token_ids, sharegpt_requests,
)


def test_random_prompts_retokenize_to_exactly_the_asked_length(tokenizer):
    requests = random_requests(tokenizer, 6, 100, 10, 0.0, seed=0)
    special = set(tokenizer.all_special_ids)
    for r in requests:
        ids = tokenizer.encode(r.prompt, add_special_tokens=False)
        assert r.prompt_len == len(ids) == 100 and r.prompt_ids == ids
        assert r.output_len == 10
        assert not special & set(ids)


def test_random_range_ratio_and_seed(tokenizer):
    requests = random_requests(tokenizer, 20, 100, 20, 0.5, seed=1)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in requests)
    assert len({r.prompt_len for r in requests}) > 1
    again = random_requests(tokenizer, 20, 100, 20, 0.5, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in requests]
    assert random_requests(tokenizer, 1, 100, 20, 0.5, seed=2)[0].prompt != requests[0].prompt


def test_random_token_ids_are_seeded_and_ordinary(tokenizer):
    ids = random_token_ids(tokenizer, 3, 50, seed=7)
    assert ids == random_token_ids(tokenizer, 3, 50, seed=7)
    assert all(len(row) == 50 and not set(row) & set(tokenizer.all_special_ids) for row in ids)


def test_prefix_repetition_prompts_share_their_prefix(tokenizer):
    requests = prefix_repetition_requests(tokenizer, 6, 40, 8, 3, 5, seed=0)
    groups: dict[int, list[str]] = {}
    for r in requests:
        groups.setdefault(r.prefix_index, []).append(r.prompt)
        assert r.output_len == 5 and r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
    assert sorted(groups) == [0, 1, 2] and all(len(p) == 2 for p in groups.values())
    prefixes = []
    for prompts in groups.values():
        shared = os.path.commonprefix(prompts)
        assert len(tokenizer.encode(shared, add_special_tokens=False)) >= 39  # the 40-token prefix, give or take a merge
        prefixes.append(shared)
    assert len(os.path.commonprefix([groups[0][0], groups[1][0]])) < len(prefixes[0]) // 2
    assert [r.prefix_index for r in requests] != [0, 1, 2, 0, 1, 2]  # shuffled


def _sharegpt(tmp_path, conversations) -> str:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    return str(path)


def test_sharegpt_first_turns_filtered_and_cycled(tokenizer, tmp_path, capsys):
    good = {"conversations": [{"from": "human", "value": "What is the tallest mountain on Earth?"},
                              {"from": "gpt", "value": "Mount Everest, at 8,849 metres."}]}
    path = _sharegpt(tmp_path, [
        good,
        {"conversations": [{"from": "human", "value": "A lonely single turn with no reply"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, friend."}]},
        {"id": "no conversations key"},
    ])
    requests = sharegpt_requests(tokenizer, path, 3, seed=0)
    reply_len = len(tokenizer.encode(good["conversations"][1]["value"], add_special_tokens=False))
    assert [r.prompt for r in requests] == [good["conversations"][0]["value"]] * 3
    assert all(r.output_len == reply_len for r in requests)
    assert "1 usable entries" in capsys.readouterr().out
    fixed = sharegpt_requests(tokenizer, path, 1, seed=0, output_len=7)
    assert fixed[0].output_len == 7


def test_sharegpt_bad_files(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="expected a JSON list"):
        sharegpt_requests(tokenizer, _sharegpt(tmp_path, {"not": "a list"}), 1, seed=0)
    with pytest.raises(DatasetError, match="no usable entries"):
        sharegpt_requests(tokenizer, _sharegpt(tmp_path, []), 1, seed=0)


def test_custom_jsonl_in_file_order(tokenizer, tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text('{"prompt": "first", "output_len": 3}\n\n{"prompt": "second"}\n')
    requests = custom_requests(tokenizer, str(path), 2, default_output_len=9)
    assert [(r.prompt, r.output_len) for r in requests] == [("first", 3), ("second", 9)]
    assert requests[0].prompt_len == len(tokenizer.encode("first", add_special_tokens=False))
    path.write_text('{"prompt": "ok"}\n{"prompt": "bad", "output_len": 0}\n')
    with pytest.raises(DatasetError, match=r"custom.jsonl:2: 'output_len' must be an integer >= 1"):
        custom_requests(tokenizer, str(path), 2, default_output_len=9)
    path.write_text('not json\n')
    with pytest.raises(DatasetError, match=r"custom.jsonl:1: not JSON"):
        custom_requests(tokenizer, str(path), 1, default_output_len=9)
