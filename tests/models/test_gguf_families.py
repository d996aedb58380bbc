"""GGUF files of the architectures whose config transformers reads from GGUF metadata (gemma2,
gemma3, phi3, qwen2, qwen3; llama is covered by the default model in tests/unit/test_loader.py), written
the way llama.cpp's converter lays them out (gguf.GGUFWriter, the gguf package's tensor-name
map, Gemma's norm weights stored plus 1), then loaded by sluice and held to the same weights
loaded from the Hugging Face state dict: same config, same tensors, same logits.
"""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sluice.loader import ModelLoadError, iter_weights, load_hf_config, resolve_model
from sluice.models.registry import get_model_class

from tests.models.test_model_forward import MiniRunner

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-6, vocab_size=300)
# Only what GGUF metadata carries differs from transformers' defaults, so the config read back
# from the file is the config the weights were made with.
CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=4,
                                                architectures=["Gemma2ForCausalLM"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=256,
                                                    architectures=["Gemma3ForCausalLM"]),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0, architectures=["Phi3ForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, architectures=["Qwen2ForCausalLM"]),
    # transformers reads no head_dim from a qwen3 GGUF: Qwen3Config's 128, what every Qwen3 uses
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=128, architectures=["Qwen3ForCausalLM"]),
}
NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}  # llama.cpp's Gemma converters store 1 + w


def add_byte_tokenizer(writer: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary of the 256 bytes, one merge and an end token: enough for transformers to
    build the file's tokenizer, and quick to parse."""
    tokens = [*bytes_to_unicode().values(), "he", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(0)


def add_decoder_metadata(writer: gguf.GGUFWriter, config) -> None:
    """The decoder's sizes, as llama.cpp's converter writes them for every architecture here."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"])
    writer.add_vocab_size(config.vocab_size)


def write_gguf(path: str, arch: str, model) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    add_decoder_metadata(writer, config)
    if arch in ("gemma2", "gemma3"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    add_byte_tokenizer(writer)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.numpy()
        if name.endswith("norm.weight"):
            data = data + NORM_SHIFT.get(arch, 0.0)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", CONFIGS)
def test_gguf_loads_like_safetensors(arch, tmp_path):
    config = CONFIGS[arch]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = str(tmp_path / f"tiny-{arch}.gguf")
    write_gguf(path, arch, hf)

    src = resolve_model(path)
    gguf_config = load_hf_config(src)
    assert gguf_config.architectures == config.architectures
    weights = dict(iter_weights(src, gguf_config, torch.float32))
    expected = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    assert sorted(weights) == sorted(expected)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)

    from_gguf = get_model_class(gguf_config)(gguf_config).eval()
    from_gguf.load_weights(weights.items())
    from_hf = get_model_class(config)(config).eval()
    from_hf.load_weights(hf.state_dict().items())
    prompt = {0: [1, 50, 200, 42, 299, 9]}
    torch.testing.assert_close(MiniRunner(from_gguf).step(prompt)[0], MiniRunner(from_hf).step(prompt)[0],
                               rtol=1e-5, atol=1e-5)


def test_gguf_without_a_transformers_config_mapping_says_so(tmp_path):
    """OLMo2 is in the registry, but transformers reads no config from an olmo2 GGUF."""
    config = transformers.Olmo2Config(**TINY, pad_token_id=0, architectures=["Olmo2ForCausalLM"])
    path = str(tmp_path / "tiny-olmo2.gguf")
    write_gguf(path, "olmo2", transformers.AutoModelForCausalLM.from_config(config))
    with pytest.raises(ModelLoadError, match="transformers cannot read a config from GGUF architecture 'olmo2'"):
        load_hf_config(resolve_model(path))
