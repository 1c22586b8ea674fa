"""BlockPool and the block-hash contract, with exact block ids and free-queue order."""

import hashlib
import struct
import subprocess
import sys

import pytest

from kvmesh.gpu.block_pool import WIRE_MASK, BlockPool, hash_block, hash_blocks, wire_hashes
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored


def make_pool(num_blocks: int = 6, block_size: int = 4, caching: bool = True) -> BlockPool:
    return BlockPool(num_blocks, block_size, enable_caching=caching)


def blake2b_128(salt: bytes, data: bytes) -> int:
    digest = hashlib.blake2b(salt + data, digest_size=16, person=b"kvmesh-block").digest()
    return int.from_bytes(digest, "little")


def test_hash_is_blake2b_128_of_salt_parent_and_tokens():
    expected = blake2b_128(b"m", struct.pack("<QQ4I", 0, 0, 1, 2, 3, 4))
    assert hash_block(None, [1, 2, 3, 4], b"m") == expected
    child = blake2b_128(
        b"m", struct.pack("<QQ4I", expected & WIRE_MASK, expected >> 64, 5, 6, 7, 8)
    )
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, salt=b"m") == [expected, child]
    assert expected >= 1 << 64 or child >= 1 << 64  # 128 bits, not 64
    parent = (5 << 100) | 7  # hash_blocks from a parent: the same chain as hash_block's
    first = hash_block(parent, [1, 2, 3, 4], b"m")
    assert hash_blocks(list(range(1, 9)), 4, parent, b"m") == [
        first,
        hash_block(first, [5, 6, 7, 8], b"m"),
    ]


def test_the_hash_key_in_the_salt_changes_every_hash():
    """Two clusters (two keys) hash the same prompt apart: nobody without the key can
    compute a block's hash."""
    tokens = list(range(64))
    one = hash_blocks(tokens, 16, salt=b"model:" + b"\1" * 32)
    two = hash_blocks(tokens, 16, salt=b"model:" + b"\2" * 32)
    assert len(set(one) | set(two)) == 8
    assert wire_hashes(one) == [h & WIRE_MASK for h in one]


def test_hash_is_stable_across_processes():
    code = "from kvmesh.gpu.block_pool import hash_blocks; print(hash_blocks(list(range(40)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(hash_blocks(list(range(40)), 16))


def test_hash_depends_on_prefix_salt_and_only_full_blocks():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert hash_blocks([1, 2, 3, 4], 4, salt=b"x") != hash_blocks([1, 2, 3, 4], 4)
    assert hash_blocks([1, 2, 3], 4) == []


def test_block_pool_module_does_not_import_torch():
    code = "import sys, kvmesh.gpu.block_pool, kvmesh.protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
