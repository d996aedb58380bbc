"""The model-loading engine arguments change what they say (tokenizer, hf_overrides, max_logprobs,
generation_config, override_generation_config, load_format), offline through `LLM`."""

from __future__ import annotations

import json
import shutil

import pytest

from sluice import LLM, SamplingParams
from sluice.loader import ModelLoadError
from tests.utils import smollm2_tokenizer

SMALL = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny llama whose generation_config.json sets sampling defaults."""
    folder = tmp_path_factory.mktemp("gen-config") / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "top_k": 1, "temperature": 0.7}))
    return str(folder)


def test_tokenizer_comes_from_another_folder(model_dir, tmp_path):
    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}CUSTOM {{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)  # tokenizer files only: no config.json, no weights
    messages = [{"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=1)
    own = LLM(model_dir, **SMALL).chat(messages, params, use_tqdm=False)[0].prompt
    other = LLM(model_dir, tokenizer=str(tmp_path), **SMALL).chat(messages, params, use_tqdm=False)[0].prompt
    assert other == "CUSTOM hi" and own != other


def test_hf_overrides_reach_the_model_config(model_dir):
    assert LLM(model_dir, **{**SMALL, "max_model_len": None}).engine_core.max_model_len == 512
    llm = LLM(model_dir, hf_overrides={"max_position_embeddings": 100}, **{**SMALL, "max_model_len": None})
    assert llm.engine_core.max_model_len == 100


def test_max_logprobs_caps_requests(model_dir):
    llm = LLM(model_dir, max_logprobs=3, **SMALL)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, logprobs=3, prompt_logprobs=3), use_tqdm=False)
    assert len(out[0].outputs[0].logprobs[0]) >= 3
    for params, name in ((SamplingParams(logprobs=4), "logprobs=4"), (SamplingParams(prompt_logprobs=-1), "prompt_logprobs=-1")):
        with pytest.raises(ValueError, match=f"{name} is more than max_logprobs=3"):
            llm.generate([[5, 6, 7]], params, use_tqdm=False)
    unlimited = LLM(model_dir, max_logprobs=-1, **SMALL)
    assert unlimited.generate([[5, 6, 7]], SamplingParams(max_tokens=1, logprobs=30), use_tqdm=False)


def test_generation_config_gives_the_default_sampling_params(model_dir, tmp_path):
    llm = LLM(model_dir, **SMALL)
    defaults = llm.get_default_sampling_params()
    assert (defaults.max_tokens, defaults.top_k, defaults.temperature) == (3, 1, 0.7)
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 or out.finish_reason == "stop"
    assert LLM(model_dir, generation_config="vllm", **SMALL).get_default_sampling_params() == SamplingParams()
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    assert LLM(model_dir, generation_config=str(tmp_path), **SMALL).get_default_sampling_params().max_tokens == 5
    overridden = LLM(model_dir, override_generation_config={"max_new_tokens": 2, "top_p": 0.5}, **SMALL)
    params = overridden.get_default_sampling_params()
    assert (params.max_tokens, params.top_p, params.top_k) == (2, 0.5, 1)
    with pytest.raises(ModelLoadError, match="generation_config: .* not found"):
        LLM(model_dir, generation_config=str(tmp_path / "nowhere"), **SMALL)


def test_load_format_must_match_the_model(model_dir, smollm2_gguf):
    with pytest.raises(ModelLoadError, match="load_format='gguf' .* is a safetensors checkpoint"):
        LLM(model_dir, load_format="gguf", **SMALL)
    with pytest.raises(ModelLoadError, match="load_format='safetensors' .* is a GGUF file"):
        LLM(smollm2_gguf, load_format="safetensors", **SMALL)
