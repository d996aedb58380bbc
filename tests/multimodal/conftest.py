import pytest

from tests.multimodal.tiny_llava import save_tiny_llava


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llava")
    save_tiny_llava(folder)
    return str(folder)


@pytest.fixture(scope="session")
def hf_llava(llava_dir):
    """transformers' own model and processor: the reference."""
    import torch
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="session")
def hf_greedy(hf_llava):
    """Greedy continuation of (prompt text, images) by transformers."""
    import torch

    model, processor = hf_llava

    def run(text: str, images: list, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        inputs = processor(text=[text], images=images or None, add_special_tokens=add_special_tokens,
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return run


@pytest.fixture(scope="session")
def qwen2_vl_dir(tmp_path_factory) -> str:
    from tests.multimodal.tiny_qwen2_vl import save_tiny_qwen2_vl

    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    save_tiny_qwen2_vl(folder)
    return str(folder)


@pytest.fixture(scope="session")
def hf_qwen2_vl(qwen2_vl_dir):
    """transformers' own model, image processor and tokenizer: the reference."""
    import torch
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir, dtype=torch.float32).eval()
    return (model, transformers.AutoImageProcessor.from_pretrained(qwen2_vl_dir),
            transformers.AutoTokenizer.from_pretrained(qwen2_vl_dir))


@pytest.fixture(scope="session")
def hf_qwen2_vl_greedy(hf_qwen2_vl):
    """Greedy continuation of (prompt text, images) by transformers (M-RoPE positions its own)."""
    import torch

    from tests.multimodal.tiny_qwen2_vl import hf_inputs

    model, image_processor, tokenizer = hf_qwen2_vl

    def run(text: str, images: list, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        inputs = hf_inputs((image_processor, tokenizer), text, images, add_special_tokens)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return run
