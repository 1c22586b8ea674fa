"""BlockManager: gives sequences KV blocks from the BlockPool, reusing cached prefixes.

A sequence's block table covers its computed tokens plus the ones scheduled now:

    tokens    [ t0 ....... t15 | t16 ...... t31 | t32 .. t37 _ _ _ _ ]
    blocks    [    b7 (hit)    |   b2 (hit)     |   b9 (fresh)       ]
              ^-- cached prefix: num_computed_tokens starts at 32

Prefix hits never cover the whole sequence: at least one token is computed, so the
model produces logits to sample from, and a shared block is never written.

With a KV connector, the full blocks after the device hits may come from outside the
pool (host DRAM, disk): they get fresh blocks at admission and count as computed; the
engine loads them before the step runs and publishes them once loaded. Which ones the
connector holds was prefetched when the request arrived (kvmesh.engine.prefetch).

    blocks    [ b7 (hit) | b2 (hit) | b4 (onboard) | b5 (onboard) | b9 (fresh) ]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmesh.engine.sequence import Sequence
from kvmesh.gpu.block_pool import BlockPool
from kvmesh.kv.block_hash import salt_with_adapter

if TYPE_CHECKING:
    from kvmesh.engine.kv_connector import KVConnector, Onboard


def num_reusable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a request of num_tokens may come from a cache
    (device or connector): all but a block holding its last token, which is always
    computed (its logits sample the next token)."""
    return (num_tokens - 1) // block_size


class BlockManager:
    def __init__(
        self, pool: BlockPool, salt: bytes = b"", connector: KVConnector | None = None
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.salt = salt
        self.connector = connector

    def hashes(self, seq: Sequence) -> list[int]:
        """seq's full-block hashes, salted with the model's salt, its adapter's and its
        cache_salt."""
        salt = self.salt if seq.lora is None else salt_with_adapter(self.salt, seq.lora.salt)
        return seq.full_block_hashes(self.block_size, seq.params.salted(salt))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks (for a seq holding no blocks)."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self.pool.match_prefix(self.hashes(seq))
        return hits[: num_reusable_blocks(seq.num_tokens, self.block_size)]

    def find_onboard(self, seq: Sequence, num_hits: int) -> list[Onboard]:
        """The connector's leading run of seq's full blocks after its `num_hits` device
        hits, leaving at least one token to compute (as find_prefix does). Called once
        per admission: seq's prefetch answers its first one only."""
        prefetched, seq.prefetched = seq.prefetched, None
        if self.connector is None or not self.pool.enable_caching:
            return []
        end = num_reusable_blocks(seq.num_tokens, self.block_size)
        if end <= num_hits:
            return []
        hashes = self.hashes(seq)
        return list(self.connector.lookup(hashes[num_hits:end], prefetched))

    def can_admit(
        self, seq: Sequence, hits: list[int], num_new_tokens: int, num_onboard: int = 0
    ) -> bool:
        """Whether seq, starting from `hits` and `num_onboard` blocks to load, can get
        blocks for those and for `num_new_tokens` more tokens.

        Hit blocks nobody references sit in the free queue; taking them shrinks it too.
        """
        num_tokens = (len(hits) + num_onboard) * self.block_size + num_new_tokens
        fresh = self.blocks_for(num_tokens) - len(hits)
        idle_hits = sum(1 for block_id in hits if self.pool.ref_counts[block_id] == 0)
        return fresh + idle_hits <= self.pool.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int], num_onboard: int = 0) -> list[int]:
        """Give seq its cached prefix blocks and fresh blocks for `num_onboard` more to be
        loaded, and mark all their tokens computed; returns the blocks to load into."""
        self.pool.touch(hits)
        onboard_ids = self.pool.allocate(num_onboard)
        seq.block_table = list(hits) + onboard_ids
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_registered_blocks = len(hits)
        return onboard_ids

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return self.pool.can_allocate(max(needed, 0))

    def can_ever_hold(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the whole pool, every other sequence's blocks freed, holds seq's
        computed tokens and `num_new_tokens` more."""
        return self.blocks_for(seq.num_computed_tokens + num_new_tokens) <= self.pool.num_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold `num_new_tokens` more computed tokens."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > 0:
            seq.block_table += self.pool.allocate(needed)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def cache_computed(self, seq: Sequence) -> None:
        """Publish seq's newly completed full blocks in the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        start = seq.num_registered_blocks
        if num_full <= start:
            return
        hashes = self.hashes(seq)
        parent = hashes[start - 1] if start else None
        self.pool.cache_blocks(seq.block_table[start:num_full], hashes[start:num_full], parent)
        seq.num_registered_blocks = num_full
