"""Block pool and KV cache manager: reference counts, prefix hits, LRU eviction, no leaks."""

import pytest

from sluice.core.block_pool import BlockPool
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request
from sluice.engine.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, token_ids: list[int], salt: str | None = None) -> Request:
    core = EngineCoreRequest(request_id, token_ids, SamplingParams(max_tokens=4), eos_token_ids=(), cache_salt=salt)
    return Request(core, max_tokens=4)


def admit(kv: KVCacheManager, request: Request) -> int:
    """Prefix lookup + allocation for the whole prompt, as the scheduler does it."""
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, hits) is not None
    request.num_computed_tokens = request.num_tokens
    return num_hit


def test_pool_reserves_null_block_and_counts_refs():
    pool = BlockPool(5, enable_caching=True)
    assert pool.num_free_blocks() == 4
    blocks = pool.allocate(2)
    assert all(b.block_id != 0 and b.ref_cnt == 1 for b in blocks)
    pool.touch(blocks)
    assert [b.ref_cnt for b in blocks] == [2, 2]
    pool.free(blocks)
    assert pool.num_free_blocks() == 2
    pool.free(blocks)
    assert pool.num_free_blocks() == 4
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_lru_eviction_order_prefers_least_recently_freed():
    pool = BlockPool(4, enable_caching=True)
    a, b, c = pool.allocate(3)
    for i, block in enumerate((a, b, c)):
        pool.cache_block(block, 100 + i, ("key", i))
    pool.free([b])
    pool.free([a])
    pool.free([c])
    (first,) = pool.allocate(1)
    assert first is b  # freed first: evicted first
    assert pool.lookup(101, ("key", 1)) is None
    assert pool.lookup(100, ("key", 0)) is a
    assert pool.num_evictions == 1


def test_hash_key_mismatch_is_a_miss():
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.cache_block(block, 7, ("a",))
    assert pool.lookup(7, ("b",)) is None


def test_prefix_hit_shares_blocks_and_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    shared = list(range(1, 9))  # two full blocks
    first = make_request("a", shared + [50, 51, 52])
    assert admit(kv, first) == 0
    second = make_request("b", shared + [60])
    assert admit(kv, second) == 8
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2]
    assert kv.pool.blocks[kv.block_ids("a")[0]].ref_cnt == 2
    # An identical prompt of exactly two blocks must still compute its last token.
    third = make_request("c", shared)
    assert admit(kv, third) == 4


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    admit(kv, make_request("a", list(range(1, 10)), salt="x"))
    assert admit(kv, make_request("b", list(range(1, 10)), salt="y")) == 0
    assert admit(kv, make_request("c", list(range(1, 10)), salt="x")) == 8


def test_freed_cached_blocks_are_reused_until_evicted():
    kv = KVCacheManager(num_blocks=5, block_size=BS, enable_caching=True)  # 4 usable
    a = make_request("a", list(range(1, 9)) + [9])
    admit(kv, a)
    kv.free(a)
    assert kv.pool.num_free_blocks() == 4
    b = make_request("b", list(range(1, 9)) + [10])
    assert admit(kv, b) == 8
    kv.free(b)
    c = make_request("c", list(range(100, 116)))  # needs all 4 blocks: evicts everything
    assert admit(kv, c) == 0
    kv.free(c)
    assert admit(kv, make_request("d", list(range(1, 9)) + [9])) == 0


def test_allocate_returns_none_when_full_and_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=False)
    a = make_request("a", list(range(12)))
    admit(kv, a)
    b = make_request("b", list(range(20, 25)))
    assert kv.allocate_slots(b, 5) is None
    assert kv.pool.num_free_blocks() == 0
    assert kv.block_ids("b") == []


def test_no_leaked_blocks_after_free_or_abort():
    kv = KVCacheManager(num_blocks=32, block_size=BS, enable_caching=True)
    requests = [make_request(str(i), list(range(i, i + 10 + i))) for i in range(6)]
    for r in requests:
        admit(kv, r)
        kv.allocate_slots(r, 3)  # decode room
    for r in requests:
        kv.free(r)
    assert kv.pool.num_free_blocks() == kv.pool.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks[1:])
    assert kv.usage() == 0.0


def test_blocks_freed_before_their_tokens_were_computed_are_not_served():
    """A request preempted in the very step that allocated (and indexed) its blocks never
    computed them: freeing it must drop those index entries, keeping the computed ones."""
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    request = make_request("a", list(range(1, 13)))
    kv.allocate_slots(request, 8)
    request.num_computed_tokens = 8  # first step ran: blocks 0-1 computed
    kv.allocate_slots(request, 4)  # second step indexes block 2 ...
    kv.free(request)  # ... but the request is preempted before it runs
    again = make_request("b", list(range(1, 13)) + [99])
    hits, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 8
