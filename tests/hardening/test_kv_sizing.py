"""The KV sizing rule: without a size the KV cache is vLLM's fixed 4 GiB (capped at what the
batch can use), the start-up log says how much was taken and why, and a cache that does not fit
the free memory is refused at start with a clear error instead of an OOM kill later."""

from __future__ import annotations

import logging

import pytest

from sluice import LLM
from sluice.platform import available_memory_bytes
from tests.server.utils import RemoteServer


def test_default_kv_cache_is_4_gib_capped_by_the_batch_and_logged(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="sluice"):
        llm = LLM(tiny_model_dir("llama"), dtype="float32", max_model_len=128, max_num_seqs=2, block_size=16)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert "from the default, as vLLM on CPU" in line and "free with the weights loaded" in line
    assert llm.engine_core.kv.pool.num_usable_blocks == 2 * (128 // 16)  # what 2 x 128 tokens can use, not 4 GiB


def test_a_kv_cache_larger_than_free_memory_is_refused_at_start(tiny_model_dir):
    # Enough sequences that the batch could use twice the free memory: the tiny model's 256-token
    # block is 2 layers x K,V x 256 tokens x 2 KV heads x 16 dims x 4 bytes = 128 KiB.
    max_num_seqs = 2 * available_memory_bytes() // (2 * (128 << 10)) + 1
    with pytest.raises(RuntimeError) as failed:
        RemoteServer(tiny_model_dir("llama"), "--dtype", "float32", "--max-model-len", "512", "--block-size", "256",
                     "--max-num-seqs", str(max_num_seqs), "--kv-cache-memory-bytes", str(1 << 50))
    log = str(failed.value)
    assert "the KV cache" in log and "does not fit" in log and "free" in log, log
