"""lm-evaluation-harness's own `local-completions` client scoring the shipped task file against a
real `sluice serve`: its loglikelihoods and is-greedy flags must agree with the same continuations
scored offline with `prompt_logprobs`. Offline: lm-eval reads the tokenizer from a local folder."""

from __future__ import annotations

import json
import os

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from sluice import LLM, SamplingParams
from sluice.loader import load_tokenizer, resolve_model
from tests.server.conftest import MODEL_NAME

TASK_FILE = os.path.join(os.path.dirname(__file__), "data", "loglikelihood_task.jsonl")


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    with open(TASK_FILE) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> str:
    """The served model's tokenizer (from its GGUF) as a folder transformers loads by path."""
    folder = str(tmp_path_factory.mktemp("smollm2-tokenizer"))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def no_downloads():
    """lm-eval and the libraries it imports must not reach the network: the Hub and datasets offline."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import, already done
        yield


@pytest.fixture(scope="module")
def lm(server, tokenizer_dir, no_downloads):
    """lm-eval's `local-completions` model; batch_size 2 sends token-id prompts in batches as well."""
    return get_model("local-completions")(model=MODEL_NAME, base_url=server.url + "/v1/completions",
                                          tokenizer_backend="huggingface", tokenizer=tokenizer_dir,
                                          batch_size=2, max_retries=1, max_length=1024)


def offline_score(offline: LLM, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of the continuation's prompt logprobs, and whether each of its tokens ranks first."""
    context_ids = tokenizer.encode(context)
    ids = tokenizer.encode(context + continuation)
    assert ids[:len(context_ids)] == context_ids, "the continuation must not merge with the context's last token"
    out = offline.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    start = len(context_ids)
    entries = [entry[token] for token, entry in zip(ids[start:], out.prompt_logprobs[start:])]
    return sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)


def test_lm_eval_local_completions_loglikelihood_agrees_with_offline_scores(lm, tasks, tokenizer):
    requests = [Instance(request_type="loglikelihood", doc=task, arguments=(task["context"], task["continuation"]),
                         idx=i) for i, task in enumerate(tasks)]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    offline = LLM(max_model_len=1024, kv_cache_memory_bytes=128 << 20, dtype="float32")
    expected = [offline_score(offline, tokenizer, t["context"], t["continuation"]) for t in tasks]
    for task, (logprob, greedy), (want_logprob, want_greedy) in zip(tasks, scores, expected):
        assert logprob == pytest.approx(want_logprob, abs=1e-3), task
        assert greedy == want_greedy, task
    assert {greedy for _, greedy in scores} == {True, False}  # the flags are compared, not all alike
    paris, berlin = scores[0][0], scores[1][0]
    assert paris > berlin
