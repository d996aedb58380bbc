"""The native bf16 kernels against PyTorch: linear (packed weights, fused epilogues), RMSNorm, argmax."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers import native
from sluice.layers.linear import GateUpLinear, Linear, pack_linears
from sluice.layers.norm import RMSNorm
from sluice.platform import cpu_flags, current_platform

pytestmark = pytest.mark.skipif(
    "avx512_bf16" not in cpu_flags() or native.load_library() is None, reason="needs the native bf16 kernels")


def assert_bf16_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """fp32 sums in another order round to the same bf16 almost always, and to a neighbour otherwise."""
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=1.6e-2)
    assert (ours != theirs).float().mean().item() < 0.01


def bf16_linear(in_features: int, out_features: int, bias: bool) -> Linear:
    torch.manual_seed(in_features + out_features)
    layer = Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 130, 500])
@pytest.mark.parametrize("in_features,out_features,bias", [(64, 64, False), (96, 200, True), (576, 960, False)])
def test_packed_linear_matches_f_linear(rows, in_features, out_features, bias):
    """Row counts around the 6-row tile and the 240-row chunk; widths off the 64-column panel."""
    layer = bf16_linear(in_features, out_features, bias)
    weight, layer_bias = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    residual = torch.randn(rows, out_features, dtype=torch.bfloat16)
    expected = F.linear(x, weight, layer_bias)
    assert layer.pack(drop_weight=True)
    assert layer.weight.numel() == 0  # the original is freed
    assert_bf16_close(layer(x), expected)
    assert_bf16_close(layer(x, residual=residual), residual + expected)
    assert_bf16_close(layer(x.view(1, rows, in_features)).view(rows, -1), expected)  # leading dims
    wide = torch.randn(rows, in_features + 2, dtype=torch.bfloat16)[:, :in_features]  # strided rows
    assert_bf16_close(layer(wide), F.linear(wide, weight, layer_bias))


@pytest.mark.parametrize("rows", [1, 9, 300])
def test_fused_gate_up_silu_matches_unfused(rows):
    torch.manual_seed(0)
    layer = GateUpLinear(128, 192).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    gate, up = F.linear(x, layer.weight.detach()).chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert layer.pack(drop_weight=True)
    assert_bf16_close(layer.silu_and_mul(x), expected)


def test_rms_norm_native_matches_torch():
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    x = torch.randn(37, 576, dtype=torch.bfloat16) * 3
    expected = norm.weight * F.rms_norm(x, (576,), eps=1e-5)
    assert_bf16_close(norm(x), expected)


def test_pack_linears_keeps_a_shared_weight(monkeypatch):
    """A tied lm_head shares the embedding's weight: it is packed, but the weight stays."""
    monkeypatch.setenv("SLUICE_LINEAR_PATH", "native")
    model = nn.Module()
    model.embed = nn.Embedding(100, 64).to(torch.bfloat16)
    model.head = Linear(64, 100, bias=False).to(torch.bfloat16)
    model.proj = Linear(64, 64, bias=False).to(torch.bfloat16)
    model.head.weight = model.embed.weight
    assert pack_linears(model) == 2
    assert model.embed.weight.shape == (100, 64) and model.proj.weight.numel() == 0
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert_bf16_close(model.head(x), F.linear(x, model.embed.weight))


def test_linear_path_timed_once_per_cpu_and_kept_on_disk(monkeypatch, tmp_path):
    """Each layer shape is timed on both paths at first start; the choice lands in the cache dir
    under this CPU's key, and a later start reads it instead of timing again."""
    from sluice.layers import linear_path

    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    linear_path._choices.cache_clear()
    model = nn.Sequential(Linear(64, 128, bias=False), Linear(128, 64, bias=True), Linear(64, 128, bias=False))
    model = model.to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = model(x)
    packed = pack_linears(model)
    stored = json.loads(next((tmp_path / "linear-paths").glob("*.json")).read_text())
    assert stored["cpu"] == current_platform("cpu").cpu_key
    assert len(stored["choices"]) == 2  # two distinct shapes, the repeated one timed once
    def chosen(layer):
        key = f"Linear {layer.out_features}x{layer.in_features} bias={layer.bias is not None} "
        return next(path for k, path in stored["choices"].items() if k.startswith(key))

    assert [layer.packed is not None for layer in model] == [chosen(layer) == "native" for layer in model]
    assert packed == sum(chosen(layer) == "native" for layer in model)
    assert_bf16_close(model(x), expected)

    linear_path._choices.cache_clear()
    monkeypatch.setattr(linear_path, "_measure", lambda module: pytest.fail("timed again"))
    again = nn.Sequential(Linear(64, 128, bias=False)).to(torch.bfloat16)
    pack_linears(again)
    assert (again[0].packed is not None) == (chosen(again[0]) == "native")


def test_linear_path_forced(monkeypatch):
    monkeypatch.setenv("SLUICE_LINEAR_PATH", "torch")
    model = nn.Sequential(Linear(64, 64, bias=False)).to(torch.bfloat16)
    assert pack_linears(model) == 0 and model[0].weight.shape == (64, 64)
    monkeypatch.setenv("SLUICE_LINEAR_PATH", "fast")
    with pytest.raises(ValueError, match="SLUICE_LINEAR_PATH must be one of native, torch"):
        pack_linears(model)


def test_argmax_matches_torch_with_ties_and_nan():
    torch.manual_seed(0)
    logits = torch.randn(7, 1000).to(torch.bfloat16)
    logits[1, 10] = logits[1, 900] = 50.0  # a tie: the first wins
    logits[2, 999] = 60.0  # in the ragged tail
    logits[3, 5] = float("nan")  # NaN counts as the maximum
    logits[4] = float("-inf")
    expected = logits.argmax(dim=-1)
    assert native.argmax(logits).tolist() == expected.tolist()
    assert native.argmax(logits[:, :999]).tolist() == logits[:, :999].argmax(dim=-1).tolist()  # strided rows
