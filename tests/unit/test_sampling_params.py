import pytest

from sluice.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.greedy and p.sampling_type == SamplingType.RANDOM


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 7)).stop_token_ids == [5, 7]
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(temperature=1).temperature == 1.0
    assert isinstance(SamplingParams(temperature=1).temperature, float)


def test_greedy_and_sampling_type():
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert g.greedy and g.sampling_type == SamplingType.GREEDY
    # Greedy ignores the truncation knobs; they are reset so the sampler skips them.
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0, seed=3).sampling_type == SamplingType.GREEDY


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    c = p.clone()
    c.stop.append("y")
    c.stop_token_ids.append(2)
    c.max_tokens = 99
    assert p.stop == ["x"] and p.stop_token_ids == [1] and p.max_tokens == 16
    assert c == SamplingParams(stop=["x", "y"], stop_token_ids=[1, 2], max_tokens=99)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n": 0}, "n must be >= 1"),
        ({"n": 1.5}, "n must be an int"),
        ({"n": True}, "n must be an int"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"presence_penalty": -2.1}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.1}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be -1 (disable) or >= 0"),
        ({"top_k": 2.0}, "top_k must be an int"),
        ({"min_p": -0.1}, "min_p must be in [0, 1]"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
        ({"seed": "1"}, "seed must be an int"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": 3.0}, "max_tokens must be an int"),
        ({"min_tokens": -1}, "min_tokens must be >= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens=4"),
        ({"logprobs": -2}, "logprobs must be >= 0"),
        ({"prompt_logprobs": -5}, "prompt_logprobs must be >= 0"),
        ({"logprobs": "5"}, "logprobs must be an int"),
        ({"stop": ""}, "stop must not contain empty strings"),
        ({"stop": ["ok", ""]}, "stop must not contain empty strings"),
        ({"stop": ["ok", 3]}, "stop must contain only strings"),
        ({"stop": 3}, "stop must be a str or a list of str"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids must be an int"),
        ({"stop_token_ids": 7}, "stop_token_ids must be a list of int"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 100_000},
        {"logprobs": -1, "prompt_logprobs": -1},
        {"logprobs": 0, "prompt_logprobs": 0},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"min_tokens": 16, "max_tokens": 16},
        {"min_tokens": 1000, "max_tokens": None},
        {"min_p": 1.0, "top_p": 1e-9},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)
