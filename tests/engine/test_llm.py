"""The offline LLM API on the default model: sampling options end to end, bad input, metrics."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.loader import ModelLoadError
from sluice.quantization.gguf import kernel_available
from sluice.worker.model_runner import _populate_when_idle


@pytest.fixture(scope="module")
def llm() -> LLM:
    # float32: in bfloat16 a matmul's rounding depends on how many rows share it, so the logits of
    # one request move with its batch (vLLM has the same property) and a sampled token near a
    # boundary may flip; in float32 that noise is far below any sampling boundary.
    return LLM(max_model_len=512, kv_cache_memory_bytes=128 << 20, dtype="float32")


def text_of(outs) -> list[str]:
    return [o.outputs[0].text for o in outs]


def test_default_model_generates_text(llm):
    """The default model is a GGUF: quantization auto runs it on its blocks where the kernel runs."""
    assert llm.engine_core.quantization == ("gguf" if kernel_available() else "none")
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == llm.get_tokenizer().encode("The capital of France is")
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 8


def test_chat_uses_the_template_and_stops_at_eos(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}],
                   SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)[0]
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
    assert "4" in out.outputs[0].text and "<|im_end|>" not in out.outputs[0].text


def test_results_come_back_in_input_order(llm):
    prompts = [f"Count from {i}:" for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
    alone = llm.generate(["Tell me a story"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=16)
    batch = llm.generate(["Hi", "Tell me a story", "Why is the sky blue?"], [noise, seeded, noise], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_n_returns_distinct_samples(llm):
    out = llm.generate(["Write a word:"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_string_cuts_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=["3"])
    out = llm.generate(["Count: 1, 2,"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "3"
    assert "3" not in out.text
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=["3"], include_stop_str_in_output=True)
    assert llm.generate(["Count: 1, 2,"], params, use_tqdm=False)[0].outputs[0].text.endswith("3")


def test_min_tokens_and_max_tokens(llm):
    chat = [{"role": "user", "content": "What is 2+2?"}]
    short = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop"
    longer = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=64, min_tokens=len(short.token_ids) + 5),
                      use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= len(short.token_ids) + 5
    ignore = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(ignore.token_ids) == 20 and ignore.finish_reason == "length"


def test_logprobs_and_prompt_logprobs(llm):
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, prompt_logprobs=2)
    out = llm.generate(["The sky is"], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token, step in zip(completion.token_ids, completion.logprobs):
        assert token in step and step[token].rank == 1  # greedy picks the top token
        assert len(step) == 3
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, step in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in step and step[token].logprob <= 0.0
    assert completion.cumulative_logprob == pytest.approx(
        sum(step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs))
    )


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("x " * 600, SamplingParams(max_tokens=4), "max_model_len is 512"),
        ("", SamplingParams(max_tokens=4), "prompt must not be empty"),
        ([], SamplingParams(max_tokens=4), "must not be empty"),
        ([10**9], SamplingParams(max_tokens=4), "prompt_token_ids must be ints in [0, 49152)"),
    ],
)
def test_bad_prompts_are_refused_and_the_engine_keeps_serving(llm, prompt, params, message):
    before = llm.get_metrics()
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate([prompt], params, use_tqdm=False)
    assert llm.get_metrics()["vllm:num_requests_waiting"] == before["vllm:num_requests_waiting"] == 0
    ok = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 2


def test_one_bad_prompt_in_a_batch_admits_none(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine_core.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_metrics_use_vllm_names(llm):
    before = llm.get_metrics()
    llm.generate(["One two three"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    after = llm.get_metrics()
    n_prompt = len(llm.get_tokenizer().encode("One two three"))
    assert after["vllm:prompt_tokens"] - before["vllm:prompt_tokens"] == n_prompt
    assert after["vllm:generation_tokens"] - before["vllm:generation_tokens"] == 5
    assert after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"] == n_prompt
    for name in ("vllm:num_preemptions", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits"):
        assert name in after
    assert after["vllm:kv_cache_usage_perc"] == 0.0


def test_missing_and_unsupported_models_fail_clearly(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))
    import json
    import shutil

    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(folder))


def test_engine_arguments_are_validated():
    with pytest.raises(ValueError, match="block_size"):
        LLM(block_size=0)
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(scheduling_policy="random")
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="int3")


def test_generation_config_eos_ids_stop_generation(tmp_path, tiny_model_dir):
    """Llama 3 style: generation_config.json lists several EOS ids; each one ends a request."""
    import json
    import shutil

    folder = tmp_path / "multi-eos"
    shutil.copytree(tiny_model_dir("qwen2"), folder)
    llm = LLM(str(folder), dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20)
    free = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    tokens = free[0].outputs[0].token_ids
    assert 2 not in tokens
    stop_at = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, tokens[stop_at]]}))
    llm = LLM(str(folder), dtype="float32", max_model_len=256, kv_cache_memory_bytes=16 << 20)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: stop_at + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None


def test_populating_the_kv_cache_leaves_its_contents_intact(llm):
    """Both ways of faulting the cache in (the all-core pass LLM makes at start, the idle-time
    thread a server's core starts) leave blocks holding a cached prefix as they are."""
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompt = "A long shared beginning, repeated to fill several blocks. " * 6
    first = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    runner = llm.engine_core.executor.worker.runner
    assert not runner.kv_populator.is_alive()  # LLM populated the cache itself and stopped it
    before = [cache.clone() for cache in runner.kv_caches]
    runner.populate_kv()
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))
    idle_thread = threading.Thread(target=_populate_when_idle, args=(runner.kv_caches, threading.Event()))
    idle_thread.start()
    idle_thread.join(timeout=60)
    assert not idle_thread.is_alive()
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))
    hits = llm.get_metrics()["vllm:prefix_cache_hits"]
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == first
    assert llm.get_metrics()["vllm:prefix_cache_hits"] > hits


def test_stop_token_text_is_not_in_the_output(llm):
    """vLLM: ' 6' for a stop_token_ids stop and 'Yes' for EOS with skip_special_tokens=False; the
    stop token's text only with include_stop_str_in_output. The token id stays in token_ids."""
    comma = llm.get_tokenizer().encode(",")[0]
    prompts = ["Count: 1, 2, 3, 4, 5,"]
    plain, kept = (llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[comma],
                                                        include_stop_str_in_output=include), use_tqdm=False)[0]
                   for include in (False, True))
    assert plain.outputs[0].text == " 6" and kept.outputs[0].text == " 6,"
    assert plain.outputs[0].token_ids[-1] == comma and plain.outputs[0].stop_reason == comma
    eos = llm.chat([{"role": "user", "content": "What is 2+2?"}],
                   SamplingParams(temperature=0.0, max_tokens=48, skip_special_tokens=False), use_tqdm=False)[0]
    assert eos.outputs[0].finish_reason == "stop"
    assert "<|im_end|>" not in eos.outputs[0].text and eos.outputs[0].text.strip()


def test_request_fields_offline(llm):
    """truncate_prompt_tokens keeps the last tokens, a prompt dict's cache_salt separates prefix
    caches, continue_final_message leaves the last turn open (vLLM's offline spellings)."""
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("Ignore this. The capital of France is")
    cut = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=4, truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-5:]
    assert cut.outputs[0].text == llm.generate([ids[-5:]], SamplingParams(temperature=0.0, max_tokens=4),
                                               use_tqdm=False)[0].outputs[0].text
    long_prompt = "Salted prompt: " + "one two three four " * 40  # several full KV blocks
    salted = [llm.generate([{"prompt": long_prompt, "cache_salt": salt}], SamplingParams(max_tokens=1),
                           use_tqdm=False)[0].num_cached_tokens for salt in ("a", "a", "b")]
    assert salted[0] == 0 and salted[1] > 0 and salted[2] == 0
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "My favourite is"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False,
                   add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("My favourite is")


def test_dashboard_records_only_steps_that_ran_tokens(llm):
    """An abort is flushed by a step that runs nothing; the dashboard's timeline shows batches only."""
    from sluice.engine.messages import EngineCoreRequest

    core = llm.engine_core
    core.dashboard.snapshot()  # someone looks from now on
    first = core.dashboard.num_steps
    core.add_request(EngineCoreRequest("dash-0", [1, 2, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True),
                                       eos_token_ids=()))
    core.step()
    core.abort_requests(["dash-0"])
    finished = [o for _ in range(3) if core.has_unfinished_requests() for o in core.step()]
    assert [(o.request_id, o.finish_reason) for o in finished] == [("dash-0", "abort")]
    assert not core.has_unfinished_requests()
    steps = [s for s in core.dashboard.steps if s[0] > first]
    assert len(steps) == 1 and steps[0][2:] == [0, 4, 1]
