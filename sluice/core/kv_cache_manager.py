"""Per-request block tables on top of the block pool, and the prefix-cache lookup.

Layout of one request's blocks (block_size 4, 10 tokens computed, 3 scheduled now):

    tokens   | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 t10 t11 | t12
    blocks   |  block 7    |  block 2    |   block 9     | block 4
              full, hashed   full, hashed   full after this   partial
              (maybe shared)                step: hashed now

`allocate_slots` is the single admission / preemption signal: it returns the new blocks, or
None when the pool cannot hold the request's next tokens.

KV cache groups (vLLM's hybrid allocator). A model whose layers all attend alike (full, or one
sliding window) has one group: a block id addresses that block in every layer. A model that
mixes them (Gemma 2 alternates windowed and global layers, Gemma 3 has five windowed per global)
splits its layers into groups of equal layer count, one kind each, and the groups share the
cache tensors: tensor i holds the i-th layer of every group, so block id b given to group g
addresses b in the tensors of g's layers only. One pool, one id space; each request holds one
block table per group, all of the same length (a position keeps its block index in every group):

    Gemma 2, 4 layers (S F S F), window 6, 13 computed; groups: full (F1, F3), sliding (S0, S2)
    cache tensors      | tensor 0: F1 / S0 | tensor 1: F3 / S2 |
    full group    |  block 3  |  block 8  |  block 5  | block 1 |   every position kept
    sliding group |  null     |  null     |  block 6  | block 2 |   t13 reads t8..t13

A position p of a windowed layer reads keys after p - sliding_window only, so a sliding group's
blocks wholly before the next token's window go back to the pool and the null block takes their
place (the attention backends never read there); a full group keeps them. With one group whose
layers are all windowed (Mistral) that group is the sliding one. A freed block keeps its hash
and stays evictable, so prefix hits still find it.

Prefix hits: block hashes carry their group (a block holds one group's layers), and a hit of h
blocks is taken only where every group has what the next token reads: a full group its blocks
0..h-1, a sliding group those of 0..h-1 its window still reaches (the null block stands in for
the others). The longest such h is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.core.block_pool import BlockPool, KVCacheBlock, hash_block
from sluice.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers whose blocks come and go together: one kind of attention (a window or none);
    layers[i] keeps its KV in the runner's i-th shared cache tensor."""

    sliding_window: int | None
    layers: tuple[int, ...]  # indices into the runner's attention layers


def kv_cache_groups(windows: list[int | None], hybrid: bool = True) -> list[KVCacheGroup]:
    """Group layers by their sliding window (None: full attention). One kind, or hybrid=False (a
    runner whose layers cannot share tensors): one group of every layer, windowed only where all
    are (by the widest window). Several kinds: groups of as many layers as the rarest kind has,
    full attention first; a kind's last group may be short (its missing tensors sit unused)."""
    kinds: dict[int | None, list[int]] = {}
    for layer, window in sorted(enumerate(windows), key=lambda lw: lw[1] is not None):
        kinds.setdefault(window, []).append(layer)
    if len(kinds) <= 1 or not hybrid:
        window = None if not windows or None in windows else max(windows)
        return [KVCacheGroup(window, tuple(range(len(windows))))]
    size = min(len(layers) for layers in kinds.values())
    return [KVCacheGroup(window, tuple(layers[i : i + size]))
            for window, layers in kinds.items() for i in range(0, len(layers), size)]


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache's shape, as the length checks (input processor, scheduler, startup log) need it."""

    num_blocks: int  # usable blocks
    block_size: int
    group_windows: tuple[int | None, ...] = (None,)  # per KV cache group: its layers' window (None: full)

    def _behind(self, window: int | None, num_computed: int) -> int:
        """Leading blocks of a group no future token reads: the next one, at position
        num_computed, reads keys from num_computed - window + 1 on."""
        if window is None:
            return 0
        return max(num_computed - window + 1, 0) // self.block_size

    def blocks_behind_window(self, num_computed: int) -> int:
        return sum(self._behind(window, num_computed) for window in self.group_windows)

    def blocks_needed(self, num_tokens: int) -> int:
        """The most blocks a request holds on its way to num_tokens tokens: in a full group all of
        them, in a sliding group those a window can straddle (the rest went back to the pool)."""
        full = cdiv(num_tokens, self.block_size)
        return sum(full if window is None else min(full, cdiv(window - 1, self.block_size) + 1)
                   for window in self.group_windows)

    def max_new_tokens(self, num_computed: int) -> int:
        """The most tokens one step can add after num_computed with the whole cache to itself
        (every group's table grows to the same length)."""
        num_groups = len(self.group_windows)
        room = (self.num_blocks + self.blocks_behind_window(num_computed)) // num_groups
        return room * self.block_size - num_computed

    def fits(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_blocks

    def describe(self, num_tokens: int) -> str:
        """Why a request of num_tokens tokens does not fit, for its error message."""
        return (f"a request of {num_tokens} tokens needs {self.blocks_needed(num_tokens)} KV blocks"
                f"{self.describe_groups(' (', ')')}; the whole cache holds {self.num_blocks} blocks of "
                f"{self.block_size} tokens")

    def describe_groups(self, before: str = "", after: str = "") -> str:
        """The groups in words ('' for one full-attention group)."""
        windows = self.group_windows
        if windows == (None,):
            return ""
        if len(windows) == 1:
            return f"{before}sliding window {windows[0]}{after}"
        kinds = {w: windows.count(w) for w in windows}
        parts = [f"{n} {'full attention' if w is None else f'sliding window {w}'}" for w, n in kinds.items()]
        return f"{before}{len(windows)} KV cache groups: {', '.join(parts)}{after}"


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, track_block_times: bool = False,
                 group_windows: tuple[int | None, ...] = (None,)) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.group_windows = tuple(group_windows)
        self.num_groups = len(self.group_windows)
        self.pool = BlockPool(num_blocks, enable_caching, track_block_times)
        self.req_blocks: dict[str, list[list[KVCacheBlock]]] = {}  # per request: one table per group
        self.num_hashed_blocks: dict[str, int] = {}  # leading blocks of a request already indexed

    @property
    def spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.pool.num_usable_blocks, self.block_size, self.group_windows)

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str, start: int = 0, group: int = 0) -> list[int]:
        """Ids of a request's blocks in one group from its `start`-th on."""
        tables = self.req_blocks.get(request_id)
        return [b.block_id for b in tables[group][start:]] if tables else []

    def get_computed_blocks(self, request: Request) -> tuple[list[list[KVCacheBlock]], int]:
        """Longest cached prefix of a request that holds no blocks yet: (blocks per group, tokens).

        At least one token is always left to compute, so the last position yields logits.
        """
        if not self.enable_caching or request.reads_every_prompt_row:
            return [], 0
        self._update_block_hashes(request)
        num_hit = (request.num_tokens - 1) // self.block_size
        found: list[list[KVCacheBlock | None]] = []
        for group, window in enumerate(self.group_windows):
            blocks = self._lookup(request, group, num_hit, stop_at_miss=window is None)
            if window is None:
                num_hit = len(blocks)
            found.append(blocks)
        while num_hit and not all(self._window_cached(blocks, window, num_hit)
                                  for blocks, window in zip(found, self.group_windows) if window is not None):
            num_hit -= 1
        if num_hit == 0:
            return [], 0
        null = self.pool.null_block
        hits = []
        for blocks, window in zip(found, self.group_windows):
            num_behind = self.spec._behind(window, num_hit * self.block_size)
            hits.append([null] * num_behind + blocks[num_behind:num_hit])
        return hits, num_hit * self.block_size

    def _lookup(self, request: Request, group: int, num_blocks: int,
                stop_at_miss: bool) -> list[KVCacheBlock | None]:
        """The group's cached blocks for the request's first num_blocks blocks (None: a miss), up to
        the first miss where stop_at_miss."""
        found: list[KVCacheBlock | None] = []
        for i in range(num_blocks):
            block = self.pool.lookup(*self._block_hash(request, i, group))
            if block is None and stop_at_miss:
                break
            found.append(block)
        return found

    def _window_cached(self, blocks: list[KVCacheBlock | None], window: int, num_hit: int) -> bool:
        """A sliding group holds what the token after num_hit blocks reads."""
        num_behind = self.spec._behind(window, num_hit * self.block_size)
        return None not in blocks[num_behind:num_hit]

    def _block_hash(self, request: Request, index: int, group: int) -> tuple[int, tuple]:
        """The index key of a request's index-th block in a group: a block holds only its group's layers."""
        block_hash, key = request.block_hashes[index]
        if group == 0:
            return block_hash, key
        key = (key, group)
        return hash(key), key

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[list[KVCacheBlock]] | None = None,
        num_lookahead_tokens: int = 0,
        cache_blocks: bool = True,
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens after the computed (and cache-hit, one list
        per group) ones, plus `num_lookahead_tokens` slots for tokens proposed ahead (speculation);
        only the known tokens' blocks are indexed in the prefix cache (none with cache_blocks=False:
        KV loaded from another engine is indexed once it arrived, by the next allocation).
        Returns the new blocks of every group."""
        computed = [list(blocks) for blocks in computed_blocks] if computed_blocks else [[] for _ in self.group_windows]
        tables = self.req_blocks.setdefault(request.request_id, [[] for _ in self.group_windows])
        num_computed = request.num_computed_tokens + len(computed[0]) * self.block_size
        null = self.pool.null_block
        for group, window in enumerate(self.group_windows):
            if window is not None:  # dead whether or not this allocation succeeds
                num_behind = self.spec._behind(window, num_computed)
                self._free_blocks_behind(tables[group], num_behind)
                computed[group] = [null] * min(num_behind, len(computed[group])) + computed[group][num_behind:]
        num_tokens_after = num_computed + num_new_tokens
        num_slots = num_tokens_after + num_lookahead_tokens
        num_needed = max(cdiv(num_slots, self.block_size) - len(tables[0]) - len(computed[0]), 0)
        num_revived = sum(1 for blocks in computed for b in blocks if b.ref_cnt == 0)
        if num_needed * self.num_groups + num_revived > self.pool.num_free_blocks():
            if not tables[0]:
                del self.req_blocks[request.request_id]
            return None
        if computed[0]:  # a first allocation: its hits are indexed already
            self.num_hashed_blocks[request.request_id] = len(computed[0])
        new_blocks = []
        for table, blocks in zip(tables, computed):
            self.pool.touch([b for b in blocks if b is not null])
            table.extend(blocks)
            new = self.pool.allocate(num_needed)
            table.extend(new)
            new_blocks += new
        if cache_blocks:
            self._cache_full_blocks(request, num_tokens_after)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first, so shared prefixes outlive unique tails.

        Blocks were indexed when allocated, for the tokens the step would compute; a request
        preempted in that same step never computed them, so their index entries go too.
        """
        tables = self.req_blocks.pop(request.request_id, [])
        self.num_hashed_blocks.pop(request.request_id, None)
        null = self.pool.null_block
        for blocks in tables:
            for block in blocks[request.num_computed_tokens // self.block_size :]:
                if block.ref_cnt == 1 and block is not null:
                    self.pool.uncache(block)
            self.pool.free([b for b in reversed(blocks) if b is not null])

    def num_held_blocks(self, request_id: str, group: int | None = None) -> int:
        """Blocks a request holds (in one group, or in all), not counting the null block standing in
        for freed ones."""
        tables = self.req_blocks.get(request_id, ())
        if group is not None:
            tables = tables[group : group + 1]
        return sum(1 for blocks in tables for b in blocks if b is not self.pool.null_block)

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
        null = self.pool.null_block
        for group, blocks in enumerate(self.req_blocks[request.request_id]):
            for i in range(done, num_full):
                if blocks[i] is not null:  # a sliding group's block already behind the window
                    self.pool.cache_block(blocks[i], *self._block_hash(request, i, group))
        self.num_hashed_blocks[request.request_id] = num_full
