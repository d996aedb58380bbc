"""Per-request block tables on top of the block pool, and the prefix-cache lookup.

Layout of one request's blocks (block_size 4, 10 tokens computed, 3 scheduled now):

    tokens   | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 t10 t11 | t12
    blocks   |  block 7    |  block 2    |   block 9     | block 4
              full, hashed   full, hashed   full after this   partial
              (maybe shared)                step: hashed now

`allocate_slots` is the single admission / preemption signal: it returns the new blocks, or
None when the pool cannot hold the request's next tokens.

With a sliding window on every attention layer (`sliding_window`: the widest), a position p
reads keys after p - sliding_window only, so blocks wholly before the next token's window
go back to the pool, and the null block takes their place in the table (positions keep their
block index; the attention backends never read there):

    window 6, 13 computed: the next token (t13) reads t8..t13
    blocks   |  null       |  null       |   block 9     | block 4
              freed: t0..t3  freed: t4..t7  t8 ..t11        t12 t13
A freed block keeps its hash and stays evictable, so prefix hits still find it.
Prefix hits use the same rule as full attention, the longest run of cached blocks from the
first; hit blocks already behind the window are never taken (the null block stands in).
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.core.block_pool import BlockPool, KVCacheBlock, hash_block
from sluice.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache's shape, as the length checks (input processor, scheduler, startup log) need it."""

    num_blocks: int  # usable blocks
    block_size: int
    sliding_window: int | None = None  # every layer windowed: the widest window

    def blocks_behind_window(self, num_computed: int) -> int:
        """Leading blocks no future token reads: the next one, at position num_computed, reads
        keys from num_computed - sliding_window + 1 on."""
        if self.sliding_window is None:
            return 0
        return max(num_computed - self.sliding_window + 1, 0) // self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """The most blocks a request holds on its way to num_tokens tokens: all of them, or with a
        window on every layer those a window can straddle (the rest went back to the pool)."""
        if self.sliding_window is None:
            return cdiv(num_tokens, self.block_size)
        return min(cdiv(num_tokens, self.block_size), cdiv(self.sliding_window - 1, self.block_size) + 1)

    def max_new_tokens(self, num_computed: int) -> int:
        """The most tokens one step can add after num_computed with the whole cache to itself."""
        return (self.num_blocks + self.blocks_behind_window(num_computed)) * self.block_size - num_computed

    def fits(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_blocks

    def describe(self, num_tokens: int) -> str:
        """Why a request of num_tokens tokens does not fit, for its error message."""
        window = f" (sliding window {self.sliding_window})" if self.sliding_window else ""
        return (f"a request of {num_tokens} tokens needs {self.blocks_needed(num_tokens)} KV blocks{window}; "
                f"the whole cache holds {self.num_blocks} blocks of {self.block_size} tokens")


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, track_block_times: bool = False,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching, track_block_times)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_hashed_blocks: dict[str, int] = {}  # leading blocks of a request already indexed

    @property
    def spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.pool.num_usable_blocks, self.block_size, self.sliding_window)

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """Ids of a request's blocks from its `start`-th on."""
        return [b.block_id for b in self.req_blocks.get(request_id, ())[start:]]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request that holds no blocks yet: (blocks, tokens).

        At least one token is always left to compute, so the last position yields logits.
        """
        if not self.enable_caching or request.reads_every_prompt_row:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash, key in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash, key)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVCacheBlock] | None = None,
        num_lookahead_tokens: int = 0,
        cache_blocks: bool = True,
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens after the computed (and cache-hit) ones,
        plus `num_lookahead_tokens` slots for tokens proposed ahead (speculation); only the
        known tokens' blocks are indexed in the prefix cache (none with cache_blocks=False: KV
        loaded from another engine is indexed once it arrived, by the next allocation)."""
        computed_blocks = computed_blocks or []
        held = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_behind = self.spec.blocks_behind_window(num_computed)
        self._free_blocks_behind(held, num_behind)  # dead whether or not this allocation succeeds
        null = self.pool.null_block
        computed_blocks = [null] * min(num_behind, len(computed_blocks)) + computed_blocks[num_behind:]
        num_tokens_after = num_computed + num_new_tokens
        num_slots = num_tokens_after + num_lookahead_tokens
        num_needed = cdiv(num_slots, self.block_size) - len(held) - len(computed_blocks)
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed + num_revived > self.pool.num_free_blocks():
            if not held:
                del self.req_blocks[request.request_id]
            return None
        if computed_blocks:  # a first allocation: its hits are indexed already
            self.num_hashed_blocks[request.request_id] = len(computed_blocks)
        self.pool.touch([b for b in computed_blocks if b is not null])
        held.extend(computed_blocks)
        new_blocks = self.pool.allocate(max(num_needed, 0))
        held.extend(new_blocks)
        if cache_blocks:
            self._cache_full_blocks(request, num_tokens_after)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first, so shared prefixes outlive unique tails.

        Blocks were indexed when allocated, for the tokens the step would compute; a request
        preempted in that same step never computed them, so their index entries go too.
        """
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_hashed_blocks.pop(request.request_id, None)
        for block in blocks[request.num_computed_tokens // self.block_size :]:
            if block.ref_cnt == 1:
                self.pool.uncache(block)
        self.pool.free([b for b in reversed(blocks) if b is not self.pool.null_block])

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks a request holds, not counting the null block standing in for freed ones."""
        return sum(1 for b in self.req_blocks.get(request_id, ()) if b is not self.pool.null_block)

    def _free_blocks_behind(self, held: list[KVCacheBlock], num_behind: int) -> None:
        """Return the held blocks before index num_behind to the pool (cached ones stay
        evictable), the null block taking their place."""
        null = self.pool.null_block
        behind = [b for b in held[:num_behind] if b is not null]
        if behind:
            held[:num_behind] = [null] * min(num_behind, len(held))
            self.pool.free(behind)

    def _update_block_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        parent = hashes[-1][0] if hashes else None
        for start in range(len(hashes) * bs, request.num_tokens - bs + 1, bs):
            tokens = tuple(request.all_token_ids[start : start + bs])
            parent, key = hash_block(parent, tokens, request.block_extra_key(start, start + bs))
            hashes.append((parent, key))

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Index the blocks that become full once this step's tokens are written."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size  # known tokens only
        done = self.num_hashed_blocks.get(request.request_id, 0)
        if num_full <= done:
            return
        self._update_block_hashes(request)
        blocks = self.req_blocks[request.request_id]
        for i in range(done, num_full):
            block_hash, key = request.block_hashes[i]
            self.pool.cache_block(blocks[i], block_hash, key)
        self.num_hashed_blocks[request.request_id] = num_full
