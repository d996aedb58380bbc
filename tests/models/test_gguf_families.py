"""GGUF files of the dense architectures the gguf package writes (gemma, gemma2, gemma3, phi3,
granite, olmo2, qwen2, qwen3; llama is covered by the default model in tests/unit/test_loader.py),
written the way llama.cpp's converter lays them out (gguf.GGUFWriter, the gguf package's
tensor-name map, Gemma's norm weights stored plus 1, llama-style Q/K rows permuted), then loaded by
sluice and held to the same weights loaded from the Hugging Face state dict: same config, same
tensors, same logits. transformers reads the config of some; sluice builds the others' from the
metadata (gemma, granite, olmo2).
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
    "gemma": lambda: transformers.GemmaConfig(**TINY, head_dim=16, architectures=["GemmaForCausalLM"]),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=4,
                                                architectures=["Gemma2ForCausalLM"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=256,
                                                    architectures=["Gemma3ForCausalLM"]),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0, architectures=["Phi3ForCausalLM"]),
    # every multiplier away from 1, so a scale read into the wrong field changes the logits
    "granite": lambda: transformers.GraniteConfig(**TINY, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                  logits_scaling=4.0, attention_multiplier=0.2,
                                                  architectures=["GraniteForCausalLM"]),
    "olmo2": lambda: transformers.Olmo2Config(**TINY, pad_token_id=0, architectures=["Olmo2ForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, architectures=["Qwen2ForCausalLM"]),
    # transformers reads no head_dim from a qwen3 GGUF: Qwen3Config's 128, what every Qwen3 uses
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=128, architectures=["Qwen3ForCausalLM"]),
}
NORM_SHIFT = {"gemma": 1.0, "gemma2": 1.0, "gemma3": 1.0}  # llama.cpp's Gemma converters store 1 + w
PERMUTED_QK = {"llama", "granite"}  # llama.cpp's LlamaModel converters reorder Q/K rows for their rope


def permute_qk(w, n_head: int):
    """llama.cpp's converter's Q/K row order (its LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.model_type == "granite":
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_logit_scale(config.logits_scaling)
        writer.add_attention_scale(config.attention_multiplier)


def converted(name: str, array, arch: str, config):
    """A checkpoint tensor as llama.cpp's converter stores it."""
    if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
        return permute_qk(array, config.num_key_value_heads if "k_proj" in name else config.num_attention_heads)
    if name.endswith("norm.weight"):
        return array + NORM_SHIFT.get(arch, 0.0)
    return array


def write_gguf(path: str, arch: str, model) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    add_decoder_metadata(writer, config)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    add_byte_tokenizer(writer)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                          converted(name, tensor.numpy(), arch, config))
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


def test_gguf_of_an_unsupported_architecture_says_so(tmp_path):
    """A GGUF architecture the registry has no entry for names itself and lists the supported ones."""
    path = str(tmp_path / "tiny-starcoder2.gguf")
    writer = gguf.GGUFWriter(path, "starcoder2")
    add_decoder_metadata(writer, transformers.Qwen2Config(**TINY))
    add_byte_tokenizer(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'starcoder2' is not supported; supported: gemma, "):
        load_hf_config(resolve_model(path))
