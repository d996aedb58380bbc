"""The hybrid KV allocator without a model: a full-attention group keeps every block, sliding
groups free theirs behind the window, the admission numbers count every group, and a prefix hit
is taken only where every group holds what the next token reads."""

import pytest

from sluice.core.kv_cache_manager import KVCacheManager, KVCacheSpec

from tests.unit.test_kv_cache import BS, make_request, run_chunks

WINDOW = 6  # with blocks of 4: the token at position p reads p-5..p


def lone_request_fits(num_blocks: int, block_size: int, windows: tuple, num_tokens: int, max_chunk: int) -> bool:
    """Whether a cache of num_blocks (+ the null block) runs one request to num_tokens tokens in
    chunks of at most max_chunk, as large as max_new_tokens allows."""
    kv = KVCacheManager(num_blocks + 1, block_size, enable_caching=False, group_windows=windows)
    request = make_request("long", list(range(num_tokens)))
    while request.num_computed_tokens < num_tokens:
        num_new = min(num_tokens - request.num_computed_tokens, max_chunk,
                      kv.spec.max_new_tokens(request.num_computed_tokens))
        if num_new < 1 or kv.allocate_slots(request, num_new) is None:
            return False
        request.num_computed_tokens += num_new
    return True


def test_sliding_group_frees_behind_the_window_and_the_full_group_keeps_all():
    kv = KVCacheManager(num_blocks=32, block_size=BS, enable_caching=True, group_windows=(None, WINDOW))
    request = make_request("a", list(range(1, 31)))  # 30 tokens: 8 blocks per group
    assert run_chunks(kv, request, 8) == [2 + 2, 4 + 4, 6 + 4, 8 + 4]  # full + sliding
    for token in (70, 71, 72):  # decodes at positions 30, 31, 32
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
    full, sliding = kv.block_ids("a", group=0), kv.block_ids("a", group=1)
    assert len(full) == len(sliding) == 9 and 0 not in full  # one table per group, of one length
    assert sliding[:6] == [0] * 6 and 0 not in sliding[6:]  # position 32 reads 27..32: blocks 6, 7, 8
    assert (kv.num_held_blocks("a", 0), kv.num_held_blocks("a", 1), kv.num_held_blocks("a")) == (9, 3, 12)
    assert not set(full) & set(sliding[6:])  # one id space: a block serves one group
    kv.free(request)
    assert kv.pool.num_free_blocks() == kv.pool.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks[1:]) and kv.pool.null_block.ref_cnt == 1


@pytest.mark.parametrize("windows", [(None, WINDOW), (None, 5, 5, 5), (None, None, 20)])
def test_blocks_needed_counts_every_group(windows):
    """A cache of exactly blocks_needed(n) blocks runs a lone request to n tokens in chunks as large
    as max_new_tokens allows, or one token at a time; one block fewer does not."""
    num_tokens = 61
    spec = KVCacheSpec(10**6, BS, windows)
    needed = spec.blocks_needed(num_tokens)
    full = -(-num_tokens // BS)
    assert needed == sum(full if w is None else min(full, -(-(w - 1) // BS) + 1) for w in windows)

    def run(num_blocks: int, max_chunk: int) -> bool:
        return lone_request_fits(num_blocks, BS, windows, num_tokens, max_chunk)

    assert run(needed, 1) and run(needed, num_tokens) and run(needed, 7)
    assert not run(needed - 1, 1)
    assert "(2 KV cache groups: 1 full attention, 1 sliding window 6)" in KVCacheSpec(8, BS, (None, 6)).describe(61)


def test_prefix_hit_needs_what_every_group_reads():
    """Hashes carry the group; a hit of h blocks needs the full group's blocks 0..h-1 and the
    sliding group's blocks the window of position h*4 still reaches (the others: the null block)."""
    kv = KVCacheManager(num_blocks=40, block_size=BS, enable_caching=True, group_windows=(None, WINDOW))
    prompt = list(range(1, 31))
    first = make_request("a", prompt)
    run_chunks(kv, first, 8)
    kv.free(first)

    def hit() -> tuple[list, int]:
        return kv.get_computed_blocks(make_request("b", prompt + [99]))

    def cached(index: int, group: int):
        return kv.pool.lookup(*kv._block_hash(first, index, group))

    hits, num_hit = hit()
    assert num_hit == 28  # 7 blocks; position 28 reads 23..28: the sliding group's blocks 5 and 6
    assert hits[0] == [cached(i, 0) for i in range(7)] and None not in hits[0]
    assert hits[1] == [kv.pool.null_block] * 5 + [cached(5, 1), cached(6, 1)]
    second = make_request("b", prompt + [99])
    assert kv.allocate_slots(second, 3, hits) is not None
    assert [b.ref_cnt for b in hits[0] + hits[1][5:]] == [1] * 9
    second.num_computed_tokens = 31
    kv.free(second)
    kv.pool.uncache(cached(0, 1))  # behind every window the hit could end at
    assert hit()[1] == 28
    kv.pool.uncache(cached(6, 1))  # now 7 blocks lack block 6; 6 blocks read 4 and 5
    assert hit()[1] == 24
    kv.pool.uncache(cached(2, 0))  # the full group stops at 2 blocks, whose window reads block 0: gone
    assert hit() == ([], 0)
    assert kv.pool.num_free_blocks() == kv.pool.num_usable_blocks
