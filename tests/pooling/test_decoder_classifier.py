"""Decoder-based sequence classifiers (transformers' Llama/Qwen2ForSequenceClassification: the score
head on the last token) through LLM.classify, LLM.reward (the head on every token) and /classify,
against transformers in float32, with prompts split over several prefill chunks."""

from __future__ import annotations

import pytest
import torch

from sluice.entrypoints.llm import LLM
from tests.pooling.conftest import DECODER_CLASSIFIERS
from tests.pooling.test_pooling import DECODER_TEXTS
from tests.server.utils import RemoteServer
from tests.utils import smollm2_tokenizer

TEXTS = [*DECODER_TEXTS, "A second sentence, long enough for two chunks of eight tokens."]
LONG = f"{TEXTS[0]} {TEXTS[2]}"  # 29 tokens: full blocks of 8 for a prefix-cache hit


@pytest.fixture(scope="module", params=list(DECODER_CLASSIFIERS))
def classifier(request, decoder_classifier_dir):
    """(sluice LLM, transformers model) over one tiny classifier; runner "auto" picks pooling."""
    import transformers

    folder = decoder_classifier_dir(request.param)
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=16, long_prefill_token_threshold=8, max_model_len=64,
              block_size=8)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    return llm, hf


def hf_scores(hf, text: str) -> torch.Tensor:
    """transformers' score head on every token's final state: [num_tokens, num_labels]."""
    ids = smollm2_tokenizer()(text, return_tensors="pt").input_ids
    base = getattr(hf, hf.base_model_prefix)
    return hf.score(base(ids).last_hidden_state)[0]


@torch.inference_mode()
def test_classify_matches_transformers(classifier):
    llm, hf = classifier
    assert llm.engine_core.pooler.classifier
    outputs = llm.classify(TEXTS)
    for text, out in zip(TEXTS, outputs):
        ids = smollm2_tokenizer()(text, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        logits = hf(ids).logits[0]
        want = logits.sigmoid() if len(logits) == 1 else logits.softmax(-1)
        assert out.outputs.probs == pytest.approx(want.tolist(), abs=1e-5)
        assert out.outputs.num_classes == hf.config.num_labels


@torch.inference_mode()
def test_reward_scores_every_token(classifier):
    """Every row is transformers' head at that token, also when the prompt's blocks are cached by an
    earlier request (a reward request reads no prefix-cache hits); its last row is the classifier's logits."""
    llm, hf = classifier
    probs = [llm.classify(LONG)[0].outputs.probs for _ in range(2)]  # the second hits the first's blocks
    hits = llm.get_metrics()["vllm:prefix_cache_hits"]
    assert hits > 0
    want = hf_scores(hf, LONG)
    for _ in range(2):
        out = llm.reward(LONG)[0]
        assert out.outputs.data.shape == (len(out.prompt_token_ids), hf.config.num_labels) == want.shape
        torch.testing.assert_close(out.outputs.data, want, atol=1e-5, rtol=1e-4)
        last = out.outputs.data[-1]
        assert (last.sigmoid() if len(last) == 1 else last.softmax(-1)).tolist() == pytest.approx(probs[1], abs=1e-5)
    assert llm.get_metrics()["vllm:prefix_cache_hits"] == hits


def test_generation_and_embedding_are_refused(decoder_classifier_dir, tiny_model_dir):
    llm = LLM(decoder_classifier_dir("llama"), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="runner='generate'"):
        llm.generate("Hi")
    embedder = LLM(tiny_model_dir("qwen3"), runner="pooling", dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="classify, score and reward need a"):
        embedder.reward("Hi")


@torch.inference_mode()
def test_classify_endpoint(decoder_classifier_dir):
    import transformers

    folder = decoder_classifier_dir("llama")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    server = RemoteServer(folder, "--dtype", "float32", "--max-model-len", "64", "--served-model-name", "cls")
    try:
        with server.http() as http:
            response = http.post("/classify", json={"model": "cls", "input": TEXTS})
        assert response.status_code == 200, response.text
        for text, item in zip(TEXTS, response.json()["data"]):
            logits = hf(smollm2_tokenizer()(text, return_tensors="pt").input_ids).logits[0]
            assert item["probs"] == pytest.approx(logits.softmax(-1).tolist(), abs=1e-5)
            assert item["label"] == hf.config.id2label[int(logits.argmax())] and item["num_classes"] == 3
    finally:
        assert server.stop() == 0
