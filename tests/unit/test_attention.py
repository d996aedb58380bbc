"""Both attention backends (write + attend over paged blocks) against a naive per-request
causal softmax attention, with and without a sliding window and a logit soft cap."""

import math

import pytest
import torch

from sluice.core.kv_cache_manager import kv_cache_groups
from sluice.layers import native
from sluice.layers.attention import BACKENDS, Attention, AttentionParams, build_attention_metadata, layer_windows
from sluice.layers.rotary import apply_rotary
from sluice.platform import current_platform
from sluice.quantization.kv_cache import get_kv_cache_quant

NATIVE_BF16 = current_platform("cpu").attention_backend_name(torch.bfloat16, 8, 64) == "native"
needs_native = pytest.mark.skipif(not NATIVE_BF16, reason="needs the native bf16 kernels (AVX-512 BF16)")
needs_library = pytest.mark.skipif(native.load_library() is None, reason="needs the native kernel library")


def reference(q, k_full, v_full, ctx, scale, window=None, soft_cap=None):
    """q [Q, H, D] at positions ctx..ctx+Q-1; k/v_full [ctx+Q, Hkv, D]. fp32 math."""
    H, Hkv = q.shape[1], k_full.shape[1]
    k = k_full.float().repeat_interleave(H // Hkv, dim=1)
    v = v_full.float().repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    qpos = ctx + torch.arange(q.shape[0])
    kpos = torch.arange(k.shape[0])[None, :]
    allowed = (kpos <= qpos[:, None]) & (kpos > qpos[:, None] - (window or k.shape[0] + 1))
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(q.shape[0], -1)


def run_case(query_lens, context_lens, H, Hkv, D=16, block_size=4, dtype=torch.float32, seed=0, backend="torch",
             window=None, soft_cap=None, kv_cache_dtype="auto"):
    """With a window, blocks wholly behind a request's first row's window are swapped for a block
    of NaNs, as a freed block reused by another request would be: they must never be read. A
    compact cache (kv_cache_dtype) is checked against the reference on its own stored values."""
    kv_quant = get_kv_cache_quant(kv_cache_dtype)
    backend = BACKENDS[backend](kv_quant)
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    need = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(need) + 8
    # shuffled, non-contiguous block ids; block 0 stays the null block
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(ids[at:at + n] + [ids[-1]] * 2)  # extra trailing entries must be ignored
        at += n
    # stale random data everywhere (finite), null block zeroed as the runner does
    shape = backend.kv_cache_shape(num_blocks, block_size, Hkv, D)
    if kv_quant is None:
        kv_cache = torch.randn(shape, generator=gen).to(dtype)
    else:  # bytes below 0x70 are finite as fp8 elements and as the high bytes of bf16 scales
        kv_cache = torch.randint(0, 0x70, shape, generator=gen, dtype=torch.uint8)
    kv_cache[:, 0] = 0
    poisoned = ids[-2]  # one of the spare blocks
    kv_cache[:, poisoned] = float("nan") if kv_quant is None else 0xFF
    k_full = [torch.randn(s, Hkv, D, generator=gen).to(dtype) for s in seq_lens]
    v_full = [torch.randn(s, Hkv, D, generator=gen).to(dtype) for s in seq_lens]
    # what the cache will hold: the reference attends over that
    stored_k, stored_v = k_full, v_full
    if kv_quant is not None:
        stored_k, stored_v = ([kv_quant.dequantize(*kv_quant.quantize(x), dtype) for x in xs]
                              for xs in (k_full, v_full))
    # earlier steps already cached each request's context
    for t, c, kf, vf in zip(tables, context_lens, k_full, v_full):
        if c:
            slots = torch.tensor([t[p // block_size] * block_size + p % block_size for p in range(c)])
            backend.write_kv(kv_cache, kf[:c], vf[:c], slots)
    qs = [torch.randn(n, H, D, generator=gen).to(dtype) for n in query_lens]
    q = torch.cat(qs)
    k = torch.cat([kf[c:] for kf, c in zip(k_full, context_lens)])
    v = torch.cat([vf[c:] for vf, c in zip(v_full, context_lens)])

    attended = tables
    if window is not None:
        attended = [[poisoned if (b + 1) * block_size <= c - window + 1 else block for b, block in enumerate(t)]
                    for t, c in zip(tables, context_lens)]
    meta = build_attention_metadata(query_lens, context_lens, attended, block_size, "cpu")
    scale = D ** -0.5
    k, v = backend.write_kv(kv_cache, k, v, meta.slot_mapping)  # as they read back
    out = backend.attend(q, k, v, kv_cache, meta, AttentionParams(scale, window, soft_cap))
    assert out.shape == (sum(query_lens), H * D) and out.dtype == dtype
    ref = torch.cat([reference(qi, kf, vf, c, scale, window, soft_cap)
                     for qi, kf, vf, c in zip(qs, stored_k, stored_v, context_lens)])
    # new K/V landed in the cache at their slots
    for t, c, kf, vf, n in zip(tables, context_lens, stored_k, stored_v, query_lens):
        table = torch.tensor([t])
        k_read, v_read = backend.read_kv(kv_cache, table, dtype)
        assert torch.equal(k_read[0, :c + n], kf) and torch.equal(v_read[0, :c + n], vf)
    return out.float(), ref, meta


CASES = {
    "pure_decode": ([1, 1, 1, 1], [5, 0, 17, 8]),
    "pure_prefill": ([7], [0]),
    "prefill_batch": ([3, 9, 4], [0, 0, 0]),
    "mixed_prefix_hit": ([1, 6, 1, 5, 2], [12, 8, 3, 0, 13]),
    "chunks_at_block_edges": ([4, 8, 1], [4, 3, 15]),
    "equal_chunks_no_padding": ([5, 5, 5], [0, 7, 2]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_paged_attention_fp32(case, H, Hkv):
    out, ref, _ = run_case(*CASES[case], H=H, Hkv=Hkv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_paged_attention_bf16(case):
    out, ref, _ = run_case(*CASES[case], H=8, Hkv=2, D=32, block_size=16, dtype=torch.bfloat16, seed=1)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


# (window, soft cap): a window shorter than a block, one spanning blocks, a cap alone, and both
WINDOW_CAP = [(1, None), (5, None), (None, 1.5), (3, 2.0)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window,soft_cap", WINDOW_CAP)
def test_window_and_soft_cap_fp32(case, window, soft_cap):
    out, ref, _ = run_case(*CASES[case], H=4, Hkv=2, window=window, soft_cap=soft_cap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_metadata_layout():
    block_size = 4
    meta = build_attention_metadata([1, 3, 1], [5, 2, 0], [[7, 3], [2, 9], [4]], block_size, "cpu")
    assert meta.num_tokens == 5
    # token 0: req0 pos 5 -> block 3 off 1; tokens 1..3: req1 pos 2,3,4 -> 2*4+2, 2*4+3, 9*4+0; token 4: req2 pos 0
    assert meta.slot_mapping.tolist() == [13, 10, 11, 36, 16]
    d, p = meta.groups()
    assert d.token_index.tolist() == [[0], [4]] and d.query_valid.all()
    assert d.block_table.tolist() == [[7, 3], [4, 0]]
    assert d.mask.shape == (2, 1, 1, 8)
    assert d.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    assert d.mask[1, 0, 0].tolist() == [True] + [False] * 7
    assert p.token_index.tolist() == [[1, 2, 3]] and p.block_table.tolist() == [[2, 9]]
    assert p.mask[0, 0].sum(-1).tolist() == [3, 4, 5]


def test_windowed_groups_gather_only_the_window():
    """A window of 3: decode at position 9 reads keys 7..9 (blocks 1, 2 of 4 tokens); the prompt
    rows at positions 2..4 read from block 0 on; padding rows see one key."""
    meta = build_attention_metadata([1, 3, 1], [9, 2, 0], [[7, 3, 5], [2, 9], [4]], 4, "cpu")
    d, p = meta.groups(3)
    assert d.block_table.tolist() == [[3, 5], [4, 0]]
    assert d.mask[0, 0, 0].tolist() == [False] * 3 + [True] * 3 + [False] * 2  # keys 4..11 -> 7, 8, 9
    assert d.mask[1, 0, 0].tolist() == [True] + [False] * 7
    assert p.block_table.tolist() == [[2, 9]]
    assert p.mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    assert meta.groups(3) is meta.groups(3) and meta.groups() is not meta.groups(3)  # built once per window
    meta = build_attention_metadata([1, 4], [20, 10], [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]], 4, "cpu")
    _, p = meta.groups(2)  # prompt rows 10..13 reach back to key 9: blocks 2 and 3
    assert p.block_table.tolist() == [[9, 10]] and p.mask[0, 0, 0].nonzero().squeeze(1).tolist() == [1, 2]


def test_padded_rows_and_no_groups():
    meta = build_attention_metadata([2, 5], [0, 3], [[1], [2, 3]], 4, "cpu")
    d, p = meta.groups()
    assert d is None and p.token_index.shape == (2, 5)
    assert p.query_valid[0].tolist() == [True, True, False, False, False]
    assert p.token_index[0].tolist() == [0, 1, 1, 1, 1]  # padding points at a valid token
    assert p.mask[0, 0, 2:].sum(-1).tolist() == [1, 1, 1] and p.mask[0, 0, 2:, 0].all()
    assert p.mask.any(-1).all()  # never an all-masked row
    meta = build_attention_metadata([1, 1], [3, 4], [[1], [2, 3]], 4, "cpu")
    d, p = meta.groups()
    assert p is None and d.block_table.tolist() == [[1, 0], [2, 3]]


def test_short_block_table_rejected():
    with pytest.raises(ValueError, match="needs 2"):
        build_attention_metadata([3], [2], [[1]], 4, "cpu")


DECODE_CASE = ([1, 1, 1, 1, 1], [0, 5, 16, 37, 70])  # decodes at and across block edges


@needs_native
@pytest.mark.parametrize("case", CASES)
def test_native_backend(case):
    out, ref, _ = run_case(*CASES[case], H=8, Hkv=2, D=32, block_size=16, dtype=torch.bfloat16, seed=1,
                           backend="native")
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@needs_native
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("H,Hkv", [(9, 3), (4, 4), (8, 1)])
def test_native_decode_kernel_shapes(D, block_size, H, Hkv):
    out, ref, _ = run_case(*DECODE_CASE, H=H, Hkv=Hkv, D=D, block_size=block_size, dtype=torch.bfloat16,
                           backend="native")
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@needs_native
@pytest.mark.parametrize("query_lens,context_lens,block_size", [
    ([1] * 16, [2080] * 16, 64),  # long decodes, eight to a thread
    ([1] * 7, [300, 1100, 40, 2100, 700, 1500, 2500], 16),  # most over more blocks than one prefetch holds
    ([1, 300, 1, 1], [2000, 0, 1300, 900], 16),  # a long prompt's rows between long decodes
])
def test_native_kernel_long_rows(query_lens, context_lens, block_size):
    """Rows longer than the kernel prefetches ahead (16 blocks), several to a thread: each thread
    fetches the next row's blocks while computing one, and stops at its last row."""
    out, ref, _ = run_case(query_lens, context_lens, H=9, Hkv=3, D=64, block_size=block_size,
                           dtype=torch.bfloat16, backend="native")
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@needs_library
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window,soft_cap", WINDOW_CAP)
def test_native_portable_path_window_and_soft_cap(case, window, soft_cap):
    """The kernel's any-dtype path (float32 here): each row from its window's first key."""
    out, ref, _ = run_case(*CASES[case], H=4, Hkv=2, backend="native", window=window, soft_cap=soft_cap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("query_lens,context_lens,block_size", [
    CASES["mixed_prefix_hit"] + (16,),
    ([1] * 5, [300, 1100, 40, 700, 150], 16),
    ([1, 200, 1, 1], [900, 0, 1300, 400], 16),  # a prompt's rows each start their own window
    ([1, 1, 1, 1, 1], [0, 5, 16, 37, 70], 4),
])
@pytest.mark.parametrize("window,soft_cap", [(37, None), (100, 2.0), (16, 50.0)])
def test_native_window_and_soft_cap(query_lens, context_lens, block_size, window, soft_cap):
    """The bf16 kernel: windows that start mid-block and span many blocks (never reading the
    poisoned ones behind them), caps that bite (1.5) and ones that barely do (50)."""
    out, ref, _ = run_case(query_lens, context_lens, H=9, Hkv=3, D=64, block_size=block_size,
                           dtype=torch.bfloat16, backend="native", window=window, soft_cap=soft_cap)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["mixed_prefix_hit", "pure_prefill"])
def test_backends_agree(case):
    """The torch backend on bf16 gives what the native one gives (and both the reference)."""
    outs = {name: run_case(*CASES[case], H=6, Hkv=2, D=64, block_size=16, dtype=torch.bfloat16, backend=name)[0]
            for name in (BACKENDS if NATIVE_BF16 else ["torch"])}
    for out in outs.values():
        torch.testing.assert_close(out, outs["torch"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_attention_layer_rotary_and_write(backend):
    """Attention(qkv, cos, sin): rotary on q and k (fused into the KV write where the backend can),
    the rotated k and raw v in the cache, and attention over them."""
    T, H, Hkv, D, block_size = 5, 4, 2, 64, 16
    gen = torch.Generator().manual_seed(3)
    attn = Attention(H, Hkv, D, backend=BACKENDS[backend]())
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).bfloat16()
    angle = torch.randn(T, 1, D // 2, generator=gen)
    cos = torch.cat((angle.cos(), angle.cos()), -1).bfloat16()
    sin = torch.cat((-angle.sin(), angle.sin()), -1).bfloat16()
    kv_cache = torch.zeros(attn.kv_cache_shape(4, block_size), dtype=torch.bfloat16)
    meta = build_attention_metadata([T], [0], [[2]], block_size, "cpu")
    out = attn(qkv, cos, sin, kv_cache, meta)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = apply_rotary(q.reshape(T, H, D), cos, sin), apply_rotary(k.reshape(T, Hkv, D), cos, sin)
    k_read, v_read = attn.backend.read_kv(kv_cache, torch.tensor([[2]]))
    torch.testing.assert_close(k_read[0, :T], k, atol=1e-2, rtol=1e-2)
    assert torch.equal(v_read[0, :T], v.reshape(T, Hkv, D))
    ref = reference(q, k, v.reshape(T, Hkv, D), 0, D ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert attn.bytes_per_block(block_size, torch.bfloat16) == 2 * block_size * Hkv * D * 2


def test_window_and_soft_cap_checked_and_kv_window():
    torch_backend = BACKENDS["torch"]()
    with pytest.raises(ValueError, match="sliding_window must be a positive number of tokens, got 0"):
        Attention(4, 2, 16, sliding_window=0, backend=torch_backend)
    with pytest.raises(ValueError, match="logits_soft_cap must be positive, got -1.0"):
        Attention(4, 2, 16, logits_soft_cap=-1.0, backend=torch_backend)

    def model(*windows):
        return torch.nn.ModuleList(Attention(4, 2, 16, sliding_window=w, backend=torch_backend) for w in windows)

    # KV cache groups: one per kind of layer, of equal layer count, full attention first; one group
    # (windowed by the widest window only when every layer has one) where layers cannot share tensors
    def groups(*windows, hybrid=True):
        return [(g.sliding_window, g.layers) for g in kv_cache_groups(layer_windows(model(*windows)), hybrid)]

    assert groups(8, 8) == [(8, (0, 1))] and groups() == [(None, ())]
    assert groups(8, 32, hybrid=False) == [(32, (0, 1))] and groups(8, None, hybrid=False) == [(None, (0, 1))]
    assert groups(8, None, 8, None) == [(None, (1, 3)), (8, (0, 2))]
    assert groups(8, 8, 8, None, 8, 8, 8, None, 8) == [(None, (3, 7)), (8, (0, 1)), (8, (2, 4)), (8, (5, 6)),
                                                       (8, (8,))]
    assert groups(8, 32) == [(8, (0,)), (32, (1,))]


KV_BACKENDS = ["torch", pytest.param("native", marks=needs_library)]


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("case", ["mixed_prefix_hit", "chunks_at_block_edges", "pure_prefill"])
def test_paged_attention_compact_kv_cache(kv_cache_dtype, backend, case):
    """A compact cache, bf16 model: written quantized, attended as stored. head_dim 64 takes the
    kernel's AVX-512 dequantization where compiled for it, 24 its portable path."""
    for D, dtype in ((64, torch.bfloat16), (24, torch.float32)):
        out, ref, _ = run_case(*CASES[case], H=6, Hkv=2, D=D, block_size=16, dtype=dtype, backend=backend,
                               kv_cache_dtype=kv_cache_dtype)
        torch.testing.assert_close(out, ref, atol=3e-2 if dtype == torch.bfloat16 else 1e-5, rtol=3e-2)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("D", [64, 48])
@needs_library
def test_compact_kv_cache_long_rows_native(kv_cache_dtype, D):
    """SmolLM2's shape (3 query heads per KV head, head_dim 64; 48 takes the 16-byte tail of a row):
    decode rows over many blocks and 16-key chunks that straddle them, in float32, where the
    kernel's vector passes must give the reference to float rounding."""
    out, ref, _ = run_case([1, 1, 3], [150, 37, 61], H=9, Hkv=3, D=D, block_size=16, backend="native",
                           kv_cache_dtype=kv_cache_dtype)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("window,soft_cap", WINDOW_CAP)
def test_compact_kv_cache_window_and_soft_cap(kv_cache_dtype, backend, window, soft_cap):
    out, ref, _ = run_case(*CASES["mixed_prefix_hit"], H=4, Hkv=2, D=32, block_size=4, backend=backend,
                           window=window, soft_cap=soft_cap, kv_cache_dtype=kv_cache_dtype)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache_dtype,bound", [("int8", 0.5 / 127), ("fp8", 2.0 ** -4)])
def test_kv_quantization_error_and_bytes(kv_cache_dtype, bound):
    """A row comes back within half a step of its absmax / qmax (int8) or within fp8 e4m3's relative
    precision (fp8), and a block takes (head_dim + 2) / (2 head_dim) of a bf16 block's bytes."""
    kv_quant = get_kv_cache_quant(kv_cache_dtype)
    x = torch.randn(64, 4, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)[:, None, None]
    restored = kv_quant.dequantize(*kv_quant.quantize(x), torch.float32)
    absmax = x.abs().amax(-1, keepdim=True)
    error = (restored - x).abs()
    if kv_cache_dtype == "int8":
        assert bool((error <= absmax * bound * 1.01).all())
    else:  # relative to each value, or to the format's smallest normal step at this row's scale
        assert bool((error <= torch.maximum(x.abs() * bound, absmax / 448 * 2.0 ** -6) * 1.01).all())
    assert torch.equal(kv_quant.quantize(torch.zeros(2, 64))[0], torch.zeros(2, 64, dtype=torch.uint8))
    bf16 = BACKENDS["torch"]().bytes_per_block(16, 4, 64, torch.bfloat16)
    assert BACKENDS["torch"](kv_quant).bytes_per_block(16, 4, 64, torch.bfloat16) * 2 * 64 == bf16 * (64 + 2)
