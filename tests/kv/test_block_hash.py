"""The block-hash contract: keyed BLAKE2b-128 chain, checked against hashlib."""

import hashlib
import struct
import subprocess
import sys

from kvmesh.kv.block_hash import WIRE_MASK, hash_block, hash_blocks, wire_hashes


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
    code = "from kvmesh.kv.block_hash import hash_blocks; print(hash_blocks(list(range(40)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(hash_blocks(list(range(40)), 16))


def test_hash_depends_on_prefix_salt_and_only_full_blocks():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert hash_blocks([1, 2, 3, 4], 4, salt=b"x") != hash_blocks([1, 2, 3, 4], 4)
    assert hash_blocks([1, 2, 3], 4) == []
