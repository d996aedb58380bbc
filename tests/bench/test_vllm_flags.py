"""`sluice bench serve` with `vllm bench serve`'s flags, against real servers: --backend and
--endpoint shaping the body, --extra-body and --header reaching the server, --num-warmups,
--random-prefix-len, and the /tokenize fallback for a served name no tokenizer loads from."""

from __future__ import annotations

import json

import pytest

from sluice.entrypoints.cli import main
from tests.bench.conftest import MODEL_NAME
from tests.server.utils import RemoteServer

ALIAS = "served-alias"  # a name the loader cannot resolve: only the server knows what it is
KEY = "bench-key"


def success_count(server: RemoteServer) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("vllm:request_success_total"))


def test_endpoint_path_alone_sends_a_chat_body(bench):
    result = bench("--endpoint", "/v1/chat/completions", "--num-prompts", "2", "--random-input-len", "16",
                   "--random-output-len", "4", "--ignore-eos")
    assert result["endpoint_type"] == "chat" and result["backend"] == "openai-chat"
    for r in result["requests"]:
        assert r["success"] and r["usage_prompt_tokens"] > r["prompt_len"]  # wrapped in the chat template


def test_backend_openai_chat_and_extra_body(bench):
    # --extra-body comes last, so its max_tokens wins over the dataset's 8: the server made 3.
    result = bench("--backend", "openai-chat", "--num-prompts", "2", "--random-input-len", "16",
                   "--random-output-len", "8", "--ignore-eos", "--extra-body", json.dumps({"max_tokens": 3}))
    assert result["backend"] == "openai-chat" and result["url"].endswith("/v1/chat/completions")
    assert [r["usage_output_tokens"] for r in result["requests"]] == [3, 3]
    assert result["total_output_tokens"] == 6


def test_num_warmups_are_sent_but_not_recorded(bench, bench_server):
    before = success_count(bench_server)
    result = bench("--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "2", "--ignore-eos",
                   "--num-warmups", "3")
    assert result["completed"] == 2 and len(result["requests"]) == 2
    assert success_count(bench_server) - before == 1 + 3 + 2  # the probe, the warm-ups, the run


def test_random_prefix_len_shares_a_cached_prefix(bench):
    result = bench("--num-prompts", "3", "--random-input-len", "8", "--random-prefix-len", "64",
                   "--random-output-len", "2", "--ignore-eos", "--max-concurrency", "1")
    records = sorted(result["requests"], key=lambda r: r["start_s"])
    for r in records:
        assert abs(r["prompt_len"] - 72) <= 2 and r["usage_prompt_tokens"] == r["prompt_len"]
    # The shared 64-token prefix fills at least three 16-token blocks whatever the boundary merges.
    assert all(r["cached_tokens"] >= 48 for r in records[1:])


@pytest.fixture(scope="module")
def aliased():
    srv = RemoteServer("--served-model-name", ALIAS, "--api-key", KEY, env={"OMP_NUM_THREADS": "1"})
    yield srv
    srv.stop()


def test_served_name_falls_back_to_the_servers_tokenizer_and_headers_reach_it(aliased, tmp_path, capsys, tokenizer):
    out = tmp_path / "alias.json"
    code = main(["bench", "serve", "--base-url", aliased.url, "--model", ALIAS, "--disable-tqdm",
                 "--header", f"Authorization=Bearer {KEY}", "x-bench=1",  # the key only through --header
                 "--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "3", "--ignore-eos",
                 "--save-result", "--result-dir", str(tmp_path), "--result-filename", out.name])
    assert code == 0
    assert "counting tokens with the server's /tokenize" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["completed"] == 2 and result["model_id"] == ALIAS
    for r in result["requests"]:
        # The dataset was built with the server's tokenizer, so its lengths are the server's.
        assert r["prompt_len"] == r["usage_prompt_tokens"] == 16 and r["output_tokens"] == 3
        assert r["output_tokens_retokenized"] == len(tokenizer.encode(r["text"], add_special_tokens=False))


def test_without_the_key_the_run_fails_clearly(aliased, capsys):
    code = main(["bench", "serve", "--base-url", aliased.url, "--model", ALIAS, "--tokenizer", MODEL_NAME,
                 "--disable-tqdm", "--num-prompts", "1", "--random-input-len", "8", "--random-output-len", "2"])
    assert code == 1 and "HTTP 401" in capsys.readouterr().err
