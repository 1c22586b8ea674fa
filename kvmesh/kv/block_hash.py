"""The block hash: torch-free, so the router, the frontend, the cache actor and every
worker import it from below the engine and the device side.

One 128-bit hash per *full* block of `block_size` tokens,

    hash_i = BLAKE2b-128( salt || le128(hash_{i-1}) || le32(tok_0) || ... || le32(tok_bs-1) )

with hash_{-1} = 0. The chain makes a block's hash identify the whole prefix up to
and including it, so "the longest run of leading blocks a pool holds" is a walk
down the request's hash list. The salt separates models (and LoRA adapters, and
tenants: SamplingParams.cache_salt) and ends with the cluster's secret hash key, so
the hash is keyed: a client cannot compute one, let alone aim a prompt at another's.

On the wire (KV events, routing, the cache actor's tiers) a block is named by the low
64 bits of its hash, `wire_hash`: enough to route by, and never trusted with KV. The
device pool keys blocks by the full hash, and every host/disk record carries the full
hash it was written for, which the worker compares before loading it
(kvmesh.engine.kv_connector): two blocks that share a wire hash are a miss, never
another block's KV.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT_PARENT_HASH = 0
HASH_BYTES = 16
WIRE_MASK = (1 << 64) - 1


@functools.lru_cache(maxsize=1024)
def _salted(salt: bytes) -> hashlib.blake2b:
    """BLAKE2b-128 with the salt (secret key included) absorbed: copied per block, so
    the salt is hashed once per salt, not once per block. BLAKE2 has no length
    extension, so a secret prefix keys it as well as its key parameter would."""
    return hashlib.blake2b(salt, digest_size=HASH_BYTES, person=b"kvmesh-block")


def hash_block(parent_hash: int | None, token_ids: Sequence[int], salt: bytes = b"") -> int:
    """The 128-bit hash of a block: its parent's hash, its token ids, under the salt
    (one step of hash_blocks' chain)."""
    if not token_ids:
        raise ValueError("a block has at least one token")
    return hash_blocks(token_ids, len(token_ids), parent_hash, salt)[0]


def wire_hash(block_hash: int) -> int:
    """What names the block on the wire: the low 64 bits of its hash."""
    return block_hash & WIRE_MASK


def wire_hashes(block_hashes: Iterable[int]) -> list[int]:
    return [block_hash & WIRE_MASK for block_hash in block_hashes]


def salt_id(salt: bytes) -> str:
    """A name for a salt that gives nothing of it away: frontends and workers of one
    cluster must hash alike, and the router compares their salt ids."""
    return hashlib.blake2b(salt, digest_size=8, person=b"kvmesh-saltid").hexdigest()


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's LoRA format
ADAPTER_MARK = b"\0adapter:"


def adapter_salt(path: str | Path) -> bytes:
    """A LoRA adapter's identity in block hashes: 16 bytes of BLAKE2b over its PEFT files
    (config, then weights), so the same adapter under any name or path is one identity,
    and a retrained one at the same path is another. ValueError names a missing file."""
    digest = hashlib.blake2b(digest_size=HASH_BYTES, person=b"kvmesh-adapter")
    for name in ADAPTER_FILES:
        file = Path(path) / name
        if not file.is_file():
            raise ValueError(f"adapter path {str(path)!r} has no {name}")
        with open(file, "rb") as f:
            digest.update(len(name).to_bytes(4, "little") + name.encode())
            digest.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.digest()


def salt_with_adapter(salt: bytes, adapter: bytes | None) -> bytes:
    """The model salt of a request served through the adapter whose adapter_salt is
    `adapter` (None: the base model's, unchanged). It goes before any cache_salt
    (SamplingParams.salted), and the adapter part is fixed-length, so no cache_salt
    string can make a base request's salt equal an adapter request's."""
    if adapter is None:
        return salt
    if len(adapter) != HASH_BYTES:
        raise ValueError(
            f"adapter salt must be {HASH_BYTES} bytes (adapter_salt), got {len(adapter)}"
        )
    return salt + ADAPTER_MARK + adapter


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    parent_hash: int | None = None,
    salt: bytes = b"",
) -> list[int]:
    """Chained hashes of every full block of `token_ids`; a partial tail is not hashed.
    hash_block's, block after block, with the tokens packed once and each digest fed to
    the next as its parent's bytes (le128 of the hash is its digest): half the time."""
    num_tokens = len(token_ids) // block_size * block_size
    if not num_tokens:
        return []
    data = memoryview(struct.pack(f"<{num_tokens}I", *token_ids[:num_tokens]))
    salted = _salted(salt)
    parent = (ROOT_PARENT_HASH if parent_hash is None else parent_hash).to_bytes(
        HASH_BYTES, "little"
    )
    step = 4 * block_size
    hashes = []
    for start in range(0, len(data), step):
        digest = salted.copy()
        digest.update(parent)
        digest.update(data[start : start + step])
        parent = digest.digest()
        hashes.append(int.from_bytes(parent, "little"))
    return hashes
