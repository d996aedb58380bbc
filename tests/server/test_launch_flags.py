"""vLLM launch flags on a real server: started as `python -m sluice.entrypoints.openai.api_server`
(vLLM's module) with a `--config` YAML file and command-line flags over it."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from tests.server.utils import RemoteServer
from tests.utils import smollm2_tokenizer


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch")
    model = folder / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 50, "top_k": 1}))
    tokenizer = smollm2_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}CUSTOM {{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(folder / "tokenizer")
    config = folder / "vllm.yaml"
    config.write_text(f"model: {model}\nserved-model-name: tiny\nmax-logprobs: 3\ntrust-remote-code: true\n"
                      f"tokenizer: {folder / 'tokenizer'}\nmax-num-seqs: 64\ndtype: float32\n"
                      # the tiny model knows 512 positions; the test servers' --max-model-len is 1024
                      "hf-overrides: {max_position_embeddings: 1024}\n")
    srv = RemoteServer("--config", str(config), "--max-logprobs", "4", "--override-generation-config",
                       '{"max_new_tokens": 5}', "--enforce-eager", "--tensor-parallel-size", "1",
                       entry=("sluice.entrypoints.openai.api_server",))
    yield srv
    srv.stop()


def test_yaml_and_flags_reach_the_server(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]  # served-model-name from the YAML
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 5  # override_generation_config over generation_config.json's 50
    assert reply.usage.prompt_tokens == len(smollm2_tokenizer().encode("CUSTOM hi", add_special_tokens=False))
    logs = server.logs()
    assert "enforce_eager: nothing to do" in logs and "trust_remote_code: accepted" in logs


def test_max_logprobs_from_the_command_line_over_the_yaml(server):
    client = server.client()
    body = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1, logprobs=True)
    assert len(client.chat.completions.create(**body, top_logprobs=4).choices[0].logprobs.content[0].top_logprobs) == 4
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**body, top_logprobs=5)
    body = error.value.body
    assert body["param"] == "top_logprobs" and "max_logprobs=4" in body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, logprobs=6)
    assert error.value.body["param"] == "logprobs" and "max_logprobs=4" in error.value.body["message"]
