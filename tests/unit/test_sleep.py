"""Sleep mode's memory moves on a small module: every kind of tensor a model holds is parked in
the disk-backed file and comes back unchanged, tied weights stay tied, and the dropped KV cache
reads as zeros."""

from __future__ import annotations

import torch
from torch import nn

from sluice.worker.sleep import SleepingWeights, drop_kv_cache, model_tensors


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight  # tied, as many LMs are
        self.proj = nn.Linear(8, 8)
        self.register_buffer("cos", torch.arange(16, dtype=torch.float32))
        self.proj.packed = torch.randn(4, 4)  # a plain tensor attribute, like a packed weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.embed(ids)) + self.cos[:8])


def snapshot(model: Tiny) -> dict[str, torch.Tensor]:
    return {"embed": model.embed.weight.detach().clone(), "proj": model.proj.weight.detach().clone(),
            "bias": model.proj.bias.detach().clone(), "cos": model.cos.clone(), "packed": model.proj.packed.clone()}


def current(model: Tiny) -> dict[str, torch.Tensor]:
    return {"embed": model.embed.weight, "proj": model.proj.weight, "bias": model.proj.bias, "cos": model.cos,
            "packed": model.proj.packed}


def test_weights_park_in_the_file_and_come_back_unchanged():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.tensor([1, 5, 7])
    expected, before, weight = model(ids), snapshot(model), model.embed.weight
    assert len(model_tensors(model)) == 5  # the tied weight once

    asleep = SleepingWeights(model)
    assert asleep.bytes >= sum(t.numel() * t.element_size() for t in before.values())
    for name, tensor in current(model).items():  # parked views of the file's mapping
        assert tensor.data_ptr() != before[name].data_ptr() and torch.equal(tensor, before[name]), name
    torch.testing.assert_close(model(ids), expected)  # still usable: pages fault back in from the file

    asleep.restore()
    assert model.head.weight is model.embed.weight is weight  # the Parameter object, still tied
    for name, tensor in current(model).items():
        assert torch.equal(tensor, before[name]), name
    torch.testing.assert_close(model(ids), expected)


def test_dropped_kv_cache_reads_as_zeros():
    import mmap

    buffer = mmap.mmap(-1, 4 * 8192, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    flat = torch.frombuffer(buffer, dtype=torch.float32)
    caches = list(flat.view(2, -1).unbind(0))
    for cache in caches:
        cache.fill_(3.0)
    assert drop_kv_cache(caches) == 4 * 8192
    assert all(torch.count_nonzero(cache) == 0 for cache in caches)
