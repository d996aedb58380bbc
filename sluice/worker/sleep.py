"""Sleep mode on CPU: give the memory of an idle engine back to the OS, keep the model ready.

vLLM's level-1 sleep offloads weights to host memory and discards the KV cache. On CPU the
weights already are host memory, so here they move to a disk-backed mapping of an unlinked
temporary file and their pages are dropped: the process's RSS falls by the size of the model,
and the kernel keeps or evicts the file's pages as it needs. The KV cache's anonymous pages
are dropped too (they read as zeros when next touched, which the attention kernels expect of
unwritten blocks). Waking copies the weights back into anonymous memory and closes the file.
Every tensor keeps its identity (parameters get new `.data`), so nothing holding the model
needs to know.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import torch
from torch import nn

MADV_DONTNEED = 4
ALIGN = 64  # bytes; every tensor starts on a cache line of the file mapping


def model_tensors(model: nn.Module) -> list[tuple[object, str, torch.Tensor]]:
    """(owner, attribute, tensor) for every distinct tensor the model holds: parameters,
    buffers and plain tensor attributes (such as a Linear's packed weight)."""
    seen: set[int] = set()
    found = []
    for module in model.modules():
        holders = [*module._parameters.items(), *module._buffers.items(),
                   *((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))]
        for name, tensor in holders:
            if tensor is None or id(tensor) in seen or tensor.numel() == 0 or tensor.device.type != "cpu":
                continue
            seen.add(id(tensor))
            found.append((module, name, tensor))
    return found


def _swap(owner, name: str, tensor: torch.Tensor, new: torch.Tensor) -> None:
    if isinstance(tensor, nn.Parameter):
        tensor.data = new  # the Parameter object stays, so tied weights stay tied
    elif name in getattr(owner, "_buffers", {}):
        owner._buffers[name] = new
    else:
        setattr(owner, name, new)


def _drop_pages(address: int, length: int) -> None:
    """Give the pages of a range of our own anonymous memory back to the OS (Linux madvise)."""
    start = address & ~(mmap.PAGESIZE - 1)
    ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length + address - start),
                                              MADV_DONTNEED)


def release_free_heap() -> None:
    """glibc keeps freed tensors' memory in its heap for reuse; hand it back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides


class SleepingWeights:
    """The model's tensors, parked in a disk-backed file mapping until `restore`."""

    def __init__(self, model: nn.Module) -> None:
        tensors = model_tensors(model)
        offsets, size = [], 0
        for _, _, tensor in tensors:
            offsets.append(size)
            size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        self.bytes = size
        self.file = tempfile.TemporaryFile(prefix="sluice-sleep-")  # unlinked: gone with the process
        self.file.truncate(max(size, 1))
        self.mapping = mmap.mmap(self.file.fileno(), max(size, 1), flags=mmap.MAP_SHARED)
        flat = torch.frombuffer(self.mapping, dtype=torch.uint8)
        self.parked: list[tuple[object, str, torch.Tensor, torch.Tensor]] = []
        for (owner, name, tensor), offset in zip(tensors, offsets):
            nbytes = tensor.numel() * tensor.element_size()
            parked = flat[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            parked.copy_(tensor)
            _swap(owner, name, tensor, parked)
            self.parked.append((owner, name, tensor, parked))
        self.mapping.flush()
        self.mapping.madvise(mmap.MADV_DONTNEED)  # out of this process's RSS; the file holds them
        os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # and out of the page cache
        release_free_heap()

    def restore(self) -> None:
        """Copy every tensor back into anonymous memory; the file goes with the last view of it."""
        for owner, name, tensor, parked in self.parked:
            _swap(owner, name, tensor, parked.clone())
        self.parked = []
        self.mapping = None
        self.file.close()


def drop_kv_cache(kv_caches: list[torch.Tensor]) -> int:
    """Drop the KV cache's pages (each layer's tensor is one contiguous range); returns bytes."""
    total = 0
    for cache in kv_caches:
        length = cache.numel() * cache.element_size()
        _drop_pages(cache.data_ptr(), length)
        total += length
    return total


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
