"""The pooling endpoints through a real server (one per module): a tiny BERT cross-encoder
whose folder also declares mean pooling + Normalize, so it answers embeddings and scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.pooling.test_pooling import DOCUMENTS, QUERY, TEXTS
from tests.server.utils import RemoteServer, parse_metrics

KEY = "pool-key"


@pytest.fixture(scope="module")
def srv(cross_encoder_dir):
    server = RemoteServer(cross_encoder_dir, "--dtype", "float32", "--max-model-len", "64", "--api-key", KEY,
                          "--served-model-name", "reranker")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def hf(cross_encoder_dir):
    import transformers

    return transformers.BertForSequenceClassification.from_pretrained(cross_encoder_dir, dtype=torch.float32).eval()


def post(srv, path: str, body: dict):
    with srv.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        return http.post(path, json={"model": "reranker", **body})


@torch.inference_mode()
def test_embeddings_openai_client(srv, hf, bert_tokenizer):
    client = srv.client(api_key=KEY)
    result = client.embeddings.create(model="reranker", input=TEXTS)  # the client asks for base64
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    for text, item in zip(TEXTS, result.data):
        states = hf.bert(**bert_tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        want = F.normalize(states.mean(0), dim=-1)
        assert F.cosine_similarity(torch.tensor(item.embedding), want, dim=0).item() > 1 - 1e-4
    assert result.usage.prompt_tokens == sum(len(bert_tokenizer(t).input_ids) for t in TEXTS)
    ids = bert_tokenizer(TEXTS[0]).input_ids
    by_ids = client.embeddings.create(model="reranker", input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)


@torch.inference_mode()
def test_score_and_rerank(srv, hf, bert_tokenizer):
    pairs = bert_tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, return_tensors="pt", padding=True)
    want = torch.sigmoid(hf(**pairs).logits[:, 0]).tolist()
    for path in ("/score", "/v1/score"):
        response = post(srv, path, {"text_1": QUERY, "text_2": DOCUMENTS})
        assert response.status_code == 200, response.text
        assert [d["score"] for d in response.json()["data"]] == pytest.approx(want, abs=1e-5)
    best = sorted(range(len(want)), key=lambda i: want[i], reverse=True)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = post(srv, path, {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}).json()
        assert [r["index"] for r in body["results"]] == best[:2]
        assert body["results"][0]["document"]["text"] == DOCUMENTS[best[0]]
        assert body["results"][0]["relevance_score"] == pytest.approx(want[best[0]], abs=1e-5)
    bare = post(srv, "/rerank", {"query": QUERY, "documents": DOCUMENTS, "return_documents": False}).json()
    assert len(bare["results"]) == 3 and "document" not in bare["results"][0]
    classified = post(srv, "/classify", {"input": TEXTS[:2]}).json()
    assert [d["num_classes"] for d in classified["data"]] == [1, 1]


def test_bad_requests(srv):
    def refused(path: str, body: dict, param: str, words: str) -> None:
        response = post(srv, path, body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error

    refused("/v1/embeddings", {"input": " ".join(["cat"] * 100)}, "input", "max_model_len")
    refused("/v1/embeddings", {"input": []}, "input", "non-empty")
    refused("/v1/embeddings", {"input": "cat", "encoding_format": "int8"}, "encoding_format", "float")
    refused("/v1/embeddings", {"input": "cat", "dimensions": 8}, "dimensions", "Matryoshka")
    refused("/rerank", {"query": QUERY, "documents": []}, "documents", "empty")
    refused("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1", "as many")
    refused("/v1/completions", {"prompt": "the cat", "max_tokens": 2}, None, "runner='pooling'")
    truncated = post(srv, "/v1/embeddings", {"input": " ".join(["cat"] * 100), "truncate_prompt_tokens": 10})
    assert truncated.json()["usage"]["prompt_tokens"] == 10
    with srv.http() as http:
        assert http.post("/v1/embeddings", json={"input": "cat"}).status_code == 401
    with srv.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        metrics = parse_metrics(http.get("/metrics").text)
    assert metrics["vllm:request_success_total"] >= 10
    assert metrics["vllm:prompt_tokens_total"] > 0
