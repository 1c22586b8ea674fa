"""BlockPool: exact block ids and free-queue order."""

import pytest

from kvmesh.gpu.block_pool import BlockPool
from kvmesh.kv.block_hash import hash_blocks, wire_hashes
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored


def make_pool(num_blocks: int = 6, block_size: int = 4, caching: bool = True) -> BlockPool:
    return BlockPool(num_blocks, block_size, enable_caching=caching)


def test_allocate_takes_lowest_free_blocks_and_free_returns_them_tail_first():
    pool = make_pool()
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([0, 1, 2])
    assert list(pool.free_queue) == [3, 4, 5, 2, 1, 0]
    assert pool.allocate(4) == [3, 4, 5, 2]


def test_cached_blocks_are_reused_by_hash_and_evicted_lru():
    pool = make_pool(num_blocks=4)
    a = pool.allocate(2)
    hashes = hash_blocks(list(range(8)), 4)
    pool.cache_blocks(a, hashes, None)
    assert pool.match_prefix(hashes + [123]) == [0, 1]
    pool.free(a)  # cached but unreferenced: still matchable
    assert pool.match_prefix(hashes) == [0, 1]
    pool.touch([0])
    assert pool.ref_counts[:2] == [1, 0] and list(pool.free_queue) == [2, 3, 1]
    assert pool.allocate(3) == [2, 3, 1]  # block 1 evicted, block 0 pinned
    assert pool.match_prefix(hashes) == [0]
    assert pool.take_events() == [
        BlockStored(block_hashes=wire_hashes(hashes), parent_hash=None),  # on the wire
        BlockRemoved(block_hashes=wire_hashes([hashes[1]])),
    ]
    assert pool.take_events() == []


def test_duplicate_hash_keeps_the_first_block():
    pool = make_pool()
    h = hash_blocks([1, 2, 3, 4], 4)
    first, second = pool.allocate(1), pool.allocate(1)
    pool.cache_blocks(first, h, None)
    pool.cache_blocks(second, h, None)
    assert pool.match_prefix(h) == first
    assert pool.block_hashes[second[0]] is None
    assert len(pool.take_events()) == 1


def test_touch_and_free_count_references():
    pool = make_pool()
    blocks = pool.allocate(2)
    pool.touch(blocks)
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    pool.free(blocks)
    assert pool.num_free_blocks == 6
    with pytest.raises(AssertionError, match="double free of block"):
        pool.free(blocks)


def test_out_of_blocks_is_a_normal_answer():
    pool = make_pool(num_blocks=2)
    assert pool.can_allocate(2) and not pool.can_allocate(3)
    pool.allocate(2)
    assert not pool.can_allocate(1) and pool.usage == 1.0


def test_caching_disabled_matches_nothing():
    pool = make_pool(caching=False)
    h = hash_blocks([1, 2, 3, 4], 4)
    pool.cache_blocks(pool.allocate(1), h, None)
    assert pool.match_prefix(h) == [] and pool.take_events() == []


def test_reset_forgets_every_hash():
    pool = make_pool()
    h = hash_blocks([1, 2, 3, 4], 4)
    pool.cache_blocks(pool.allocate(1), h, None)
    pool.reset_prefix_cache()
    assert pool.match_prefix(h) == []
    assert pool.take_events()[-1] == AllBlocksCleared()


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "field"), [(0, 4, "num_blocks"), (4, 0, "block_size")]
)
def test_bad_sizes_are_refused(num_blocks, block_size, field):
    with pytest.raises(ValueError, match=field):
        BlockPool(num_blocks, block_size)
