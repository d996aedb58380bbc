"""Qwen2-VL offline: greedy parity with transformers (float32) for images of two sizes in prompts
and in chats, with M-RoPE positions computed per request whatever the step holds: prefill chunks
that cut through an image's placeholders, prefix-cache hits that start mid-prompt, and requests
preempted and recomputed. The decoder stack serves M-RoPE layers bit for bit."""

import pytest
import torch

from sluice.entrypoints.llm import LLM
from sluice.multimodal.media import MediaError
from sluice.platform import current_platform
from sluice.sampling_params import SamplingParams
from tests.multimodal.tiny_llava import data_url, image_chat, make_image
from tests.multimodal.tiny_qwen2_vl import IMAGE, TINY_TEXT, save_tiny_qwen2_vl

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
WIDE = (64, 30)  # a 4 x 8 patch grid (8 image tokens); make_image's default size gives 6 x 4 (6 tokens)


@pytest.fixture(scope="module")
def llm(qwen2_vl_dir):
    # 4-token blocks and 7-token prefill chunks: image placeholder runs span several of both
    return LLM(qwen2_vl_dir, dtype="float32", block_size=4, max_num_batched_tokens=32, long_prefill_token_threshold=7,
               kv_cache_memory_bytes=1 << 22, limit_mm_per_prompt={"image": 2})


def test_generate_with_images_matches_transformers(llm, hf_qwen2_vl_greedy):
    one, two = make_image(1), make_image(2, size=WIDE)
    prompts = [
        {"prompt": f"Look: {IMAGE}\nWhat is it?", "multi_modal_data": {"image": one}},
        {"prompt": f"{IMAGE} or {IMAGE}, which one?", "multi_modal_data": {"image": [two, one]}},
        "A plain text prompt",
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == hf_qwen2_vl_greedy(prompts[0]["prompt"], [one], MAX_TOKENS)
    assert outputs[1].outputs[0].token_ids == hf_qwen2_vl_greedy(prompts[1]["prompt"], [two, one], MAX_TOKENS)
    assert outputs[2].outputs[0].token_ids == hf_qwen2_vl_greedy(prompts[2], [], MAX_TOKENS)
    image_token_id = llm.input_processor.mm_processor.image_token_id
    assert outputs[1].prompt_token_ids.count(image_token_id) == 8 + 6


def test_chat_with_image_parts_matches_transformers(llm, hf_qwen2_vl, hf_qwen2_vl_greedy):
    image = make_image(3, size=WIDE)
    messages = image_chat("What is in this picture?", data_url(image))
    [out] = llm.chat(messages, GREEDY, use_tqdm=False)
    shown = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image"}]}]
    text = hf_qwen2_vl[2].apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    assert out.outputs[0].token_ids == hf_qwen2_vl_greedy(text, [image], MAX_TOKENS, add_special_tokens=False)


def test_same_image_shares_prefix_blocks(llm, hf_qwen2_vl_greedy):
    """The second request starts from cached blocks past the image, so its first computed
    position is mid-prompt, after the image's grid positions; another image shares only the text."""
    first, other = make_image(4), make_image(5)
    prompt = f"Describe {IMAGE}\nin one word"
    assert llm.reset_prefix_cache()
    a = llm.generate({"prompt": prompt, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt": prompt, "multi_modal_data": {"image": first}}, GREEDY, use_tqdm=False)[0]
    swapped = llm.generate({"prompt": prompt, "multi_modal_data": {"image": other}}, GREEDY, use_tqdm=False)[0]
    image_start = a.prompt_token_ids.index(llm.input_processor.mm_processor.image_token_id)
    assert again.num_cached_tokens >= image_start + 6
    assert again.outputs[0].token_ids == a.outputs[0].token_ids == hf_qwen2_vl_greedy(prompt, [first], MAX_TOKENS)
    assert swapped.num_cached_tokens <= image_start
    assert swapped.outputs[0].token_ids == hf_qwen2_vl_greedy(prompt, [other], MAX_TOKENS)


def test_preempted_requests_recompute_their_positions(qwen2_vl_dir, hf_qwen2_vl_greedy):
    """A KV cache too small for all three requests: some are preempted mid-decode and recompute
    prompt and output (their positions again from the request), and still match transformers."""
    llm = LLM(qwen2_vl_dir, dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory_bytes=48 << 10,
              enable_prefix_caching=False)
    images = [make_image(20 + i, size=WIDE) for i in range(3)]
    prompts = [{"prompt": f"Picture {i}: {IMAGE} tell", "multi_modal_data": {"image": image}}
               for i, image in enumerate(images)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.get_metrics()["vllm:num_preemptions"] > 0
    for prompt, image, out in zip(prompts, images, outputs):
        assert out.outputs[0].token_ids == hf_qwen2_vl_greedy(prompt["prompt"], [image], 24)


def test_image_errors_reach_the_shared_checks(llm):
    assert llm.input_processor.mm_processor.placeholder == IMAGE  # the "string" content format shows this
    image = make_image(6)
    with pytest.raises(MediaError, match="at most 2") as info:
        llm.generate({"prompt": IMAGE * 3, "multi_modal_data": {"image": [image] * 3}}, GREEDY)
    assert info.value.param == "multi_modal_data.image[2]"
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholders for 2 images"):
        llm.generate({"prompt": IMAGE, "multi_modal_data": {"image": [image, image]}}, GREEDY)
    with pytest.raises(MediaError, match="not an image") as info:
        llm.chat(image_chat("hi", "data:image/png;base64,aGVsbG8="), GREEDY)
    assert info.value.param == "messages.0.content.1.image_url"


@pytest.mark.skipif(not current_platform("cpu").native_kernels(torch.bfloat16),
                    reason="the native bf16 kernels need AVX-512 BF16")
def test_decoder_stack_serves_mrope_layers_bit_for_bit(tmp_path):
    """M-RoPE changes only the cos/sin rows the layers are given, so the one-call stack gives the
    tokens and logprobs of the layers run one by one."""
    text = dict(TINY_TEXT, hidden_size=128, intermediate_size=256,  # head_dim 32: the native attention's
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    save_tiny_qwen2_vl(tmp_path, text=text)
    llm = LLM(str(tmp_path), dtype="bfloat16", max_num_batched_tokens=12, kv_cache_memory_bytes=8 << 20,
              enable_prefix_caching=False)
    decoder = llm.engine_core.executor.worker.runner.model.language_model.model
    prompts = [{"prompt": f"{IMAGE} or {IMAGE}?", "multi_modal_data": {"image": [make_image(7, WIDE), make_image(8)]}},
               "A plain text prompt"]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)

    def run():
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        return [(o.token_ids, [entry[t].logprob for t, entry in zip(o.token_ids, o.logprobs)]) for o in outs]

    assert decoder.decoder_stack is not None
    with_stack = run()
    stack, decoder.decoder_stack = decoder.decoder_stack, None
    try:
        assert run() == with_stack
    finally:
        decoder.decoder_stack = stack


def test_loads_both_checkpoint_layouts(qwen2_vl_dir):
    """The original Qwen2-VL layout (`model.`, `visual.`, `lm_head.`: what transformers saves) and
    transformers 5's module names (`model.language_model.`, `model.visual.`) load the same."""
    import transformers
    from safetensors.torch import load_file

    from sluice.models.qwen2_vl import Qwen2VLForConditionalGeneration

    config = transformers.AutoConfig.from_pretrained(qwen2_vl_dir)
    saved = load_file(f"{qwen2_vl_dir}/model.safetensors")
    assert any(name.startswith("visual.") for name in saved) and any(name.startswith("model.layers.") for name in saved)
    renamed = {("model." + name if name.startswith("visual.") else
                name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name): tensor
               for name, tensor in saved.items()}
    models = []
    for seed, weights in enumerate((saved, renamed)):
        torch.manual_seed(seed)  # different random starts: equal only where loading set every value
        model = Qwen2VLForConditionalGeneration(config)
        model.load_weights(weights.items())
        models.append(model.state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])
    with pytest.raises(ValueError, match="unexpected parameter 'vision_tower.x'"):
        Qwen2VLForConditionalGeneration(config).load_weights([("vision_tower.x", torch.zeros(1))])


def test_qwen2_5_vl_matches_transformers(tmp_path):
    """Qwen2.5-VL: the same path with its own tower (windowed attention in block 0)."""
    import transformers

    from tests.multimodal.tiny_qwen2_vl import hf_inputs

    save_tiny_qwen2_vl(tmp_path, family="qwen2_5_vl")
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    processors = (transformers.AutoImageProcessor.from_pretrained(tmp_path),
                  transformers.AutoTokenizer.from_pretrained(tmp_path))
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory_bytes=1 << 22)
    images = [make_image(30, size=WIDE), make_image(31, size=(60, 60))]
    prompt = f"{IMAGE} then {IMAGE}: same?"
    [out] = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, GREEDY, use_tqdm=False)
    inputs = hf_inputs(processors, prompt, images)
    with torch.no_grad():
        expected = hf.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out.outputs[0].token_ids == expected.tolist()


def test_original_flat_config_with_tied_embeddings():
    """Qwen/Qwen2-VL-2B-Instruct's config.json shape: text fields at the top level, rope_scaling
    {"type": "mrope"}, tie_word_embeddings on the outer config."""
    import transformers

    from sluice.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from tests.multimodal.tiny_qwen2_vl import TINY_VISION

    text = {k: v for k, v in TINY_TEXT.items() if k != "rope_parameters"}
    config = transformers.Qwen2VLConfig.from_dict({
        **text, "vocab_size": 128, "tie_word_embeddings": True, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {**TINY_VISION, "hidden_size": 64, "patch_size": 8}})
    model = Qwen2VLForConditionalGeneration(config)
    assert model.lm_head.weight is model.language_model.model.embed_tokens.weight
    assert model.language_model.model.rotary_emb.sections == [(0, 2), (2, 5), (5, 8)]
