"""LoRA through a real server (two API processes) and the openai client: adapters as models,
runtime load/unload seen by every API process, and every bad load answered 400 naming the
field, the server still right afterwards."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import httpx
import openai
import psutil
import pytest

from tests.lora.test_parity import NUM_TOKENS, PROMPTS, greedy, peft_model
from tests.server.utils import RemoteServer, parse_samples
from tests.utils import smollm2_tokenizer

API_KEY = "lora-key"


@pytest.fixture(scope="module")
def setup(lora_models, tmp_path_factory):
    model_dir, adapters = lora_models("llama")
    allowed = tmp_path_factory.mktemp("allowed")
    for name in ("b", "c"):
        shutil.copytree(adapters[name], allowed / name)
    srv = RemoteServer(model_dir, "--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                       "--lora-modules", f"a={adapters['a']}",
                       json.dumps({"name": "a2", "path": adapters["a"], "base_model_name": "tiny"}),
                       "--enable-lora-runtime-update", "--lora-allowed-dirs", str(allowed), "--api-key", API_KEY,
                       "--served-model-name", "tiny", "--api-server-count", "2")
    hf = peft_model(model_dir, {name: adapters[name] for name in ("a", "c")})
    yield srv, allowed, hf
    srv.stop()


def expected(hf, adapter: str | None) -> str:
    """transformers + PEFT's greedy text for PROMPTS[0]."""
    if adapter is None:
        with hf.disable_adapter():
            tokens, _ = greedy(hf, PROMPTS[0])
    else:
        hf.set_adapter(adapter)
        tokens, _ = greedy(hf, PROMPTS[0])
    return smollm2_tokenizer().decode(tokens)


def complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=NUM_TOKENS, temperature=0.0,
                                     extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_adapters_as_models(setup):
    srv, _, hf = setup
    client = srv.client(api_key=API_KEY)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "a", "a2"}
    assert cards["a"].parent == "tiny" and cards["a2"].parent == "tiny"
    assert complete(client, "a") == complete(client, "a2") == expected(hf, "a")
    assert complete(client, "tiny") == expected(hf, None)
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "nope")
    assert err.value.body["param"] == "model"
    info = [labels for name, labels, _ in parse_samples(srv.http(headers={"Authorization": f"Bearer {API_KEY}"}).get("/metrics").text)
            if name == "vllm:lora_requests_info"]
    assert info and info[-1]["max_lora"] == "2"


def test_runtime_load_unload_and_bad_loads(setup):
    srv, allowed, hf = setup
    http = srv.http(headers={"Authorization": f"Bearer {API_KEY}"})
    assert srv.http().post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(allowed / "c")}) \
        .status_code == 401
    outside = tempfile.mkdtemp()
    shutil.copytree(allowed / "c", os.path.join(outside, "c"))
    bad_config = allowed / "bad"
    bad_config.mkdir()
    (bad_config / "adapter_config.json").write_text("{not json")
    bad = {
        "missing path": str(allowed / "missing"),
        "bad config": str(bad_config),
        "rank over the limit": str(allowed / "b"),  # rank 16 > --max-lora-rank 8
        "outside the allowed dirs": os.path.join(outside, "c"),
    }
    for what, path in bad.items():
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert response.status_code == 400, what
        assert response.json()["error"]["param"] == "lora_path", what
    assert "max_lora_rank" in http.post("/v1/load_lora_adapter", json={
        "lora_name": "x", "lora_path": bad["rank over the limit"]}).json()["error"]["message"]
    shutil.rmtree(outside)

    response = http.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(allowed / "c")})
    assert response.status_code == 200, response.text
    client = srv.client(api_key=API_KEY)
    assert complete(client, "c") == expected(hf, "c")
    assert complete(client, "a") == expected(hf, "a")  # still right after the refusals
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "c")
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "c"}).status_code == 404


def api_processes(srv: RemoteServer) -> dict[int, psutil.Process]:
    """The processes holding the server's accepted connections, by pid (filled as they are met)."""
    return {p.pid: p for p in psutil.Process(srv.process.pid).children(recursive=True)}


def connection_to(srv: RemoteServer, pid: int | None, exclude: set[int] = frozenset()) -> tuple[int, httpx.Client]:
    """A keep-alive connection served by API process `pid` (None: any not in `exclude`), found by
    opening connections until the kernel hands one to it."""
    processes = api_processes(srv)
    for _ in range(200):
        http = srv.http(headers={"Authorization": f"Bearer {API_KEY}"})
        response = http.get("/v1/models")
        port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        owner = next(p for p, proc in processes.items()
                     if any(c.raddr and c.raddr.port == port for c in proc.net_connections("tcp")))
        if owner == pid or (pid is None and owner not in exclude):
            return owner, http
        http.close()
    raise AssertionError(f"no connection reached API process {pid}")


def test_runtime_loads_reach_every_api_process(setup):
    srv, allowed, hf = setup
    first, load_through = connection_to(srv, None)
    second, _ = connection_to(srv, None, exclude={first})
    name = "c-everywhere"
    response = load_through.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(allowed / "c")})
    assert response.status_code == 200, response.text
    for pid in (first, second):
        _, http = connection_to(srv, pid)
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        assert cards[name]["parent"] == "tiny"
        reply = http.post("/v1/completions", json={"model": name, "prompt": PROMPTS[0], "max_tokens": NUM_TOKENS,
                                                    "temperature": 0.0, "ignore_eos": True})
        assert reply.json()["choices"][0]["text"] == expected(hf, "c")
    _, unload_through = connection_to(srv, second)
    assert unload_through.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    for pid in (first, second):
        _, http = connection_to(srv, pid)
        assert name not in {card["id"] for card in http.get("/v1/models").json()["data"]}
        reply = http.post("/v1/completions", json={"model": name, "prompt": PROMPTS[0], "max_tokens": 1})
        assert reply.status_code == 404
