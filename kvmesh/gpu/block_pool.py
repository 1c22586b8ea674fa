"""The KV block pool's bookkeeping: torch-free.

The router, the cache actor and every worker import this module, so it must not
import torch. The tensors themselves live in kvmesh.gpu.kv_cache; the block hash that
keys the prefix cache in kvmesh.kv.block_hash.

Eviction policy: a block whose reference count drops to zero keeps its hash and
joins the tail of the free queue; allocation pops from the head, so the least
recently freed block is reused first (LRU over free blocks). A cache hit on a
free block takes it out of the queue again. Blocks of one sequence are freed
tail-first, so a sequence's last blocks are evicted before its shared prefix.

With `track_evictions` (a KV connector is attached), every cached block that
`allocate` evicts is also recorded as (block hash, block id): its KV is still intact
until the engine runs the step, so the connector can offload it first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvmesh.kv.block_hash import wire_hash, wire_hashes
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class BlockPool:
    """Reference-counted KV blocks with a prefix cache (hash -> block) and LRU reuse.

    Keyed by full block hashes; its KV events name blocks by wire hash.
    Out of blocks is a normal answer (`can_allocate` is False), not an exception:
    the scheduler decides whom to preempt.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        track_evictions: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks, least recently freed first; values unused (an ordered set).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.events: list[KVEvent] = []
        # (hash, block id) of cached blocks evicted since take_evicted; None: not tracked
        self.evicted: list[tuple[int, int]] | None = [] if track_evictions else None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached-but-unused ones included."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def match_prefix(self, block_hashes: Iterable[int]) -> list[int]:
        """Block ids holding the longest run of leading `block_hashes`."""
        if not self.enable_caching:
            return []
        hits = []
        for block_hash in block_hashes:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_queue)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` fresh blocks, evicting the least recently used cached ones."""
        assert self.can_allocate(num_blocks), (num_blocks, len(self.free_queue))
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self.free_queue.popitem(last=False)
            self._uncache(block_id)
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on blocks found by `match_prefix`."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference; blocks reaching zero join the free queue, last block first."""
        for block_id in reversed(block_ids):
            assert self.ref_counts[block_id] > 0, f"double free of block {block_id}"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def cache_blocks(
        self, block_ids: Sequence[int], block_hashes: Sequence[int], parent_hash: int | None
    ) -> None:
        """Publish newly filled blocks in the prefix cache, in chain order.

        A hash already cached in another block (two sequences computed the same
        prefix at once) keeps its first block; the duplicate stays private.
        """
        if not self.enable_caching:
            return
        stored = []
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            if block_hash in self.cached or self.block_hashes[block_id] is not None:
                continue
            self.cached[block_hash] = block_id
            self.block_hashes[block_id] = block_hash
            stored.append(block_hash)
        if stored:
            first = block_hashes.index(stored[0])
            parent = parent_hash if first == 0 else block_hashes[first - 1]
            self.events.append(
                BlockStored(
                    block_hashes=wire_hashes(stored),
                    parent_hash=None if parent is None else wire_hash(parent),
                )
            )

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights); blocks in use stay allocated."""
        self.cached.clear()
        self.block_hashes = [None] * self.num_blocks
        self.events.append(AllBlocksCleared())
        if self.evicted:
            self.evicted.clear()  # stale KV (e.g. old weights): not worth offloading

    def take_events(self) -> list[KVEvent]:
        """Stored/removed events since the last call, oldest first."""
        events, self.events = self.events, []
        return events

    def take_evicted(self) -> list[tuple[int, int]]:
        """(block hash, block id) of cached blocks `allocate` evicted since the last call,
        oldest first; their KV stays intact until the new owner writes. Empty when
        evictions are not tracked."""
        if not self.evicted:
            return []
        evicted, self.evicted = self.evicted, []
        return evicted

    def _uncache(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is None:
            return
        self.block_hashes[block_id] = None
        del self.cached[block_hash]
        self.events.append(BlockRemoved(block_hashes=[wire_hash(block_hash)]))
        if self.evicted is not None:
            self.evicted.append((block_hash, block_id))
