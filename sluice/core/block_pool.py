"""The pool of fixed-size KV blocks: reference counts, prefix-cache index, LRU eviction.

A block is in exactly one of three states:
  in use      ref_cnt > 0, owned by one or more requests (shared prefix blocks have ref_cnt > 1)
  free+cached ref_cnt == 0, still indexed by its hash: a later request may revive it
  free        ref_cnt == 0, no hash
Free blocks (cached or not) sit in one LRU queue; allocation takes from its front, evicting
the cached content of whatever block it takes. Block 0 is the null block: never allocated,
zero-filled by the runner, used to pad block tables.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from sluice.metrics.stats import KVBlockEvents

BlockHashKey = tuple  # (parent hash, token ids, extra key): verified on every hit


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    hash_key: BlockHashKey | None = None
    allocated_time: float = 0.0  # these two are kept only with --kv-cache-metrics
    last_used_time: float = 0.0  # last taken or released


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], extra_key: object) -> tuple[int, BlockHashKey]:
    """Chained hash of one full block; the key is kept to rule out collisions on lookup."""
    key = (parent_hash, token_ids, extra_key)
    return hash(key), key


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool, track_block_times: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (1 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # never freed
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:]
        )
        self.cached: dict[int, KVCacheBlock] = {}
        self.num_evictions = 0
        self.block_events = KVBlockEvents() if track_block_times else None

    def take_block_events(self) -> KVBlockEvents:
        """Block timings since the last call (empty unless tracking)."""
        events = self.block_events
        if events is None:
            return KVBlockEvents()
        self.block_events = KVBlockEvents()
        return events

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of usable blocks held by requests (free cached blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_usable_blocks

    def lookup(self, block_hash: int, hash_key: BlockHashKey) -> KVCacheBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.hash_key != hash_key:
            return None
        return block

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache, reviving free ones."""
        now = time.time() if self.block_events is not None else 0.0
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1
            if self.block_events is not None:
                self.block_events.reuse_gaps.append(now - block.last_used_time)
                block.last_used_time = now

    def allocate(self, num: int) -> list[KVCacheBlock]:
        if num > len(self.free_queue):
            raise RuntimeError(f"asked for {num} blocks with {len(self.free_queue)} free")
        now = time.time() if self.block_events is not None else 0.0
        out = []
        for _ in range(num):
            _, block = self.free_queue.popitem(last=False)
            if self._evict(block) and self.block_events is not None:
                self.block_events.lifetimes.append(now - block.allocated_time)
                self.block_events.idle_before_evict.append(now - block.last_used_time)
            block.ref_cnt = 1
            block.allocated_time = block.last_used_time = now
            out.append(block)
        return out

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the LRU tail in the given order."""
        now = time.time() if self.block_events is not None else 0.0
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                block.last_used_time = now

    def cache_block(self, block: KVCacheBlock, block_hash: int, hash_key: BlockHashKey) -> None:
        """Index a block whose tokens are final. A duplicate of an indexed block stays unindexed."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        block.hash_key = hash_key
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no request holds a block."""
        if len(self.free_queue) != self.num_usable_blocks:
            return False
        for block in self.blocks[1:]:
            self._evict(block)
        return True

    def uncache(self, block: KVCacheBlock) -> None:
        """Drop a block's index entry (its contents will never be computed)."""
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None
        block.hash_key = None

    def _evict(self, block: KVCacheBlock) -> bool:
        """Forget a block's cached content; True if it was indexed (a real eviction)."""
        if block.block_hash is None:
            return False
        evicted = self.cached.get(block.block_hash) is block
        self.num_evictions += evicted
        self.uncache(block)
        return evicted
