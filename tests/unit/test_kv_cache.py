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


def run_chunks(kv: KVCacheManager, request: Request, chunk: int) -> list[int]:
    """Prefill in chunks as the scheduler does; the blocks held after each step."""
    held = []
    while request.num_computed_tokens < request.num_tokens:
        n = min(chunk, request.num_tokens - request.num_computed_tokens)
        assert kv.allocate_slots(request, n) is not None
        request.num_computed_tokens += n
        held.append(kv.num_held_blocks(request.request_id))
    return held


def test_window_frees_the_blocks_behind_it():
    """Window 6, blocks of 4: the next token at position p reads p-5..p, so blocks wholly
    before that go back to the pool and the null block stands in for them."""
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_caching=True, group_windows=(6,))  # 7 usable
    request = make_request("a", list(range(1, 31)))  # 30 tokens: 8 blocks, more than the pool has
    assert run_chunks(kv, request, 8) == [2, 4, 4, 4]
    for token in (70, 71, 72):  # decodes at positions 30, 31, 32
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
    # position 32 reads 27..32: blocks 6 (t24..t27), 7 (t28..t31) and 8 (t32)
    ids = kv.block_ids("a")
    assert ids[:6] == [0] * 6 and 0 not in ids[6:] and kv.num_held_blocks("a") == 3
    assert kv.pool.null_block.ref_cnt == 1
    kv.free(request)
    assert kv.pool.num_free_blocks() == kv.pool.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks[1:])


def test_window_prefix_hit_takes_only_the_blocks_the_window_needs():
    """The hit is the longest run of blocks whose window is cached; those already behind the next
    token's window stay in the pool (free, still cached) and the null block stands in."""
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, group_windows=(6,))
    prompt = list(range(1, 31))
    first = make_request("a", prompt)
    run_chunks(kv, first, 8)
    kv.free(first)
    second = make_request("b", prompt)
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 28  # blocks 0..6: those the window freed kept their hashes
    assert kv.allocate_slots(second, 2, hits) is not None
    # position 28 reads 23..28: blocks 5 and 6 revived, one new block for t28, t29
    ids = kv.block_ids("b")
    assert ids[:5] == [0] * 5 and ids[5:7] == [b.block_id for b in hits[0][5:7]] and len(ids) == 8
    assert hits[0][:5] == [kv.pool.null_block] * 5 and [b.ref_cnt for b in hits[0][5:]] == [1, 1]
    kv.free(second)
    assert kv.pool.num_free_blocks() == kv.pool.num_usable_blocks
