"""Offline pooling (LLM.embed / classify / score) against transformers + the configured pooling,
float32, within cosine 1 - 1e-4: a Qwen3-style decoder embedder (LAST + normalize, chunked
prefill), mean pooling over chunks, BERT embedders (mean and CLS from sentence-transformers
files) and a BERT cross-encoder's scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.entrypoints.llm import LLM
from sluice.pooling.params import PoolingParams

from tests.utils import smollm2_tokenizer

TEXTS = ["the cat sat on the mat", "paris is the capital of france", "dog", "where is the blue house by the river"]
DECODER_TEXTS = ["Hello world, this sentence runs over several prefill chunks of eight tokens each.", "Hi"]
QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "the cat sat on the mat", "berlin is a city in germany"]


def assert_close(got: list[float], want: torch.Tensor) -> None:
    cosine = F.cosine_similarity(torch.tensor(got), want.float(), dim=0).item()
    assert cosine > 1 - 1e-4, cosine
    assert len(got) == want.shape[0]


@pytest.fixture(scope="module")
def decoder(tiny_model_dir):
    """A tiny random Qwen3 decoder as a Matryoshka embedder; the budget forces chunked prefill."""
    folder = tiny_model_dir("qwen3")
    llm = LLM(folder, runner="pooling", dtype="float32", max_num_batched_tokens=16, long_prefill_token_threshold=8,
              max_model_len=64, hf_overrides={"matryoshka_dimensions": [16, 64]})
    import transformers

    yield llm, transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


@torch.inference_mode()
def test_decoder_last_token_normalized(decoder):
    llm, hf = decoder
    outputs = llm.embed(DECODER_TEXTS)
    for text, out in zip(DECODER_TEXTS, outputs):
        ids = smollm2_tokenizer()(text, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        assert_close(out.outputs.embedding, F.normalize(hf(ids).last_hidden_state[0, -1], dim=-1))
        assert abs(torch.tensor(out.outputs.embedding).norm().item() - 1) < 1e-5
    cut = llm.embed(DECODER_TEXTS[1], PoolingParams(dimensions=16))[0].outputs.embedding  # truncate + renormalize
    assert_close(cut, F.normalize(torch.tensor(outputs[1].outputs.embedding[:16]), dim=-1))
    with pytest.raises(ValueError, match="more than the model's 64"):
        llm.embed("Hi", PoolingParams(dimensions=65))
    metrics = llm.get_metrics()
    assert metrics["vllm:request_success"] >= 2
    assert metrics["vllm:prompt_tokens"] >= sum(len(o.prompt_token_ids) for o in outputs)


@torch.inference_mode()
def test_decoder_mean_over_chunks(tiny_model_dir):
    """MEAN sums chunk by chunk in the runner; pooler_config overrides the LAST default."""
    folder = tiny_model_dir("qwen3")
    llm = LLM(folder, task="embed", dtype="float32", max_num_batched_tokens=16, long_prefill_token_threshold=8,
              max_model_len=64, pooler_config={"pooling_type": "MEAN", "normalize": False})
    import transformers

    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    out = llm.encode(DECODER_TEXTS[0])[0]
    ids = smollm2_tokenizer()(DECODER_TEXTS[0], return_tensors="pt").input_ids
    assert_close(out.outputs.data.tolist(), hf(ids).last_hidden_state[0].mean(0))
    assert not llm.engine_core.kv.enable_caching  # mean reads every token: no prefix caching


@pytest.fixture(scope="module")
def bert_llm(bert_dir):
    """Factory: pooling -> an LLM over that BERT embedder, built once."""
    llms: dict[str, LLM] = {}

    def build(pooling: str) -> LLM:
        if pooling not in llms:
            llms[pooling] = LLM(bert_dir(pooling), dtype="float32")  # runner auto: an encoder-only model pools
        return llms[pooling]

    return build


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@torch.inference_mode()
def test_bert_embeddings(bert_dir, bert_llm, bert_tokenizer, pooling):
    import transformers

    folder = bert_dir(pooling)
    llm = bert_llm(pooling)
    hf = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    for text, out in zip(TEXTS, llm.embed(TEXTS)):
        states = hf(**bert_tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        pooled = states.mean(0) if pooling == "mean" else states[0]
        assert_close(out.outputs.embedding, F.normalize(pooled, dim=-1))


@torch.inference_mode()
def test_cross_encoder_scores_and_classify(cross_encoder_dir, bert_tokenizer):
    import transformers

    llm = LLM(cross_encoder_dir, dtype="float32")
    hf = transformers.BertForSequenceClassification.from_pretrained(cross_encoder_dir, dtype=torch.float32).eval()
    pairs = bert_tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, return_tensors="pt", padding=True)
    logits = hf(**pairs).logits[:, 0]
    scores = [o.outputs.score for o in llm.score(QUERY, DOCUMENTS)]
    assert scores == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # the pairs really differ
    probs = llm.classify(TEXTS[:2])
    single = hf(**bert_tokenizer(TEXTS[:2], return_tensors="pt", padding=True)).logits[:, 0]
    assert [p.outputs.probs[0] for p in probs] == pytest.approx(torch.sigmoid(single).tolist(), abs=1e-5)


@torch.inference_mode()
def test_xlm_roberta_reranker(xlm_roberta_dir, bert_tokenizer):
    import transformers

    llm = LLM(xlm_roberta_dir, dtype="float32")
    assert llm.engine_core.max_model_len == 65  # 66 position rows; row 0 (the padding index) comes before position 0
    hf = transformers.XLMRobertaForSequenceClassification.from_pretrained(xlm_roberta_dir, dtype=torch.float32).eval()
    pairs = bert_tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, return_tensors="pt", padding=True)
    pairs.pop("token_type_ids")
    want = torch.sigmoid(hf(**pairs).logits[:, 0]).tolist()
    assert [o.outputs.score for o in llm.score(QUERY, DOCUMENTS)] == pytest.approx(want, abs=1e-5)


def test_bad_inputs(bert_llm, tiny_model_dir):
    with pytest.raises(ValueError, match="runner='pooling'"):
        LLM(tiny_model_dir("qwen3"), dtype="float32", max_model_len=64).embed("hi")
    llm = bert_llm("cls")
    with pytest.raises(ValueError, match="max_model_len"):
        llm.embed(" ".join(["cat"] * 100))
    out = llm.embed(" ".join(["cat"] * 100), truncate_prompt_tokens=64)[0]
    assert len(out.prompt_token_ids) == 64
    with pytest.raises(ValueError, match="Matryoshka"):
        llm.embed("dog", PoolingParams(dimensions=8))
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        llm.classify("dog")
    with pytest.raises(ValueError, match="runner='generate'"):
        llm.generate("the cat")
    with pytest.raises(ValueError, match="as many queries"):
        llm.score(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="task"):
        PoolingParams(task="generate")


@torch.inference_mode()
def test_bert_int8_embeddings(bert_dir, bert_tokenizer):
    """--quantization int8 on an encoder: weights per output channel, activations per token, on the
    VNNI kernel with the residual add and GELU fused (or weight-only where there is no kernel),
    close to transformers' float32."""
    import transformers

    folder = bert_dir("mean")
    llm = LLM(folder, dtype="float32", quantization="int8")
    layer = llm.engine_core.executor.worker.runner.model.encoder.layer[0]
    assert layer.intermediate.dense.quant_method.describe().startswith("int8 per channel")
    hf = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    for text, out in zip(TEXTS, llm.embed(TEXTS)):
        states = hf(**bert_tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        cosine = F.cosine_similarity(torch.tensor(out.outputs.embedding), F.normalize(states.mean(0), dim=-1), dim=0)
        assert cosine > 0.999, cosine


@torch.inference_mode()
def test_encoder_dtype_auto(bert_dir, bert_tokenizer, monkeypatch):
    """dtype auto for an encoder is settled by linear_path.prompt_dtype (a timed matmul per dtype,
    patched here to choose bfloat16): the BERT path (fused QKV on the bf16 kernels) then
    runs in bfloat16, close to transformers' float32."""
    import transformers

    import sluice.pooling.config as pooling_config
    from sluice.config import resolve_dtype

    monkeypatch.setattr(pooling_config, "prompt_dtype", lambda model_config, hidden, inner: torch.bfloat16)
    folder = bert_dir("mean")
    llm = LLM(folder, dtype="auto")
    assert llm.engine_core.executor.worker.runner.dtype == resolve_dtype("auto")  # bf16 where the CPU has it
    hf = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    for text, out in zip(TEXTS, llm.embed(TEXTS)):
        states = hf(**bert_tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        cosine = F.cosine_similarity(torch.tensor(out.outputs.embedding), F.normalize(states.mean(0), dim=-1), dim=0)
        assert cosine > 0.99, cosine
