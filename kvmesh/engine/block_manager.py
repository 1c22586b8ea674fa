"""BlockManager: gives sequences KV blocks from the BlockPool, reusing cached prefixes.

A sequence's block table covers its computed tokens plus the ones scheduled now:

    tokens    [ t0 ....... t15 | t16 ...... t31 | t32 .. t37 _ _ _ _ ]
    blocks    [    b7 (hit)    |   b2 (hit)     |   b9 (fresh)       ]
              ^-- cached prefix: num_computed_tokens starts at 32

Prefix hits never cover the whole sequence: at least one token is computed, so the
model produces logits to sample from, and a shared block is never written.
"""

from __future__ import annotations

from kvmesh.engine.sequence import Sequence
from kvmesh.gpu.block_pool import BlockPool


class BlockManager:
    def __init__(self, pool: BlockPool, salt: bytes = b"") -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.salt = salt

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks (for a seq holding no blocks)."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self.pool.match_prefix(seq.full_block_hashes(self.block_size, self.salt))
        if len(hits) * self.block_size >= seq.num_tokens:
            hits = hits[:-1]
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether seq, starting from `hits`, can get blocks for `num_new_tokens` more tokens.

        Hit blocks nobody references sit in the free queue; taking them shrinks it too.
        """
        num_tokens = len(hits) * self.block_size + num_new_tokens
        fresh = self.blocks_for(num_tokens) - len(hits)
        idle_hits = sum(1 for block_id in hits if self.pool.ref_counts[block_id] == 0)
        return fresh + idle_hits <= self.pool.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give seq its cached prefix blocks and mark those tokens computed."""
        self.pool.touch(hits)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return self.pool.can_allocate(max(needed, 0))

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
        hashes = seq.full_block_hashes(self.block_size, self.salt)
        parent = hashes[start - 1] if start else None
        self.pool.cache_blocks(seq.block_table[start:num_full], hashes[start:num_full], parent)
        seq.num_registered_blocks = num_full
