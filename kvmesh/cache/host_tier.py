"""The host-DRAM tier: fixed-size slots of KV block records in one shared-memory segment.

One process owns it (the cache actor): it creates the segment, keeps the index block
hash -> slot and the eviction policy, and hands out slots. The node's workers attach by
name and copy records in and out of the slots themselves, with no message per byte.

Layout of the segment's pool (after SharedSegment's own header):

    0                                   table_bytes (4096-aligned)
    [ header 0 | header 1 | ... | header n-1 ][ payload 0 ][ payload 1 ] ... [ payload n-1 ]
      4 x u64 each:                              record_bytes each, every one starting
      gen | hash | length | checksum             at a multiple of PAYLOAD_ALIGN

A slot's header is a sequence lock. gen 0: never written; odd: being written; even:
the payload holds `length` bytes of block `hash`, whose XXH3-64 is `checksum`.

    write:  gen -> odd,  payload,  hash | length | checksum,  gen -> odd + 1
    read:   header h1 (even, our hash),  copy payload,  header h2;  h2 == h1 and
            XXH3-64(copy) == checksum,  else a miss

A reader whose copy overlapped a rewrite sees the header changed (the writer made gen
odd before touching the payload); the checksum of the copy catches everything else
(a torn write by a dead worker, a stray byte). So a concurrent eviction or a corruption
is a miss, never another block's data. The ordering argument holds on x86 (stores and
loads are not reordered with each other); elsewhere the checksum is what stands guard.

Ownership of slots: `allocate` hands a slot to one writer and keeps it out of eviction
until `commit` (the writer finished: the header names the block) or `abort`. The block
evicted for it stays readable in the slot until the writer begins, so the owner may
still copy it elsewhere (TieredStore demotes it to disk).
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import xxhash

from kvmesh.cache.eviction import make_policy
from kvmesh.kv.segment import SharedSegment

HEADER_WORDS = 4
GEN, HASH, LENGTH, CHECKSUM = range(HEADER_WORDS)
HEADER_BYTES = HEADER_WORDS * 8
TABLE_ALIGN = 4096
PAYLOAD_ALIGN = 64


class HostTierInfo(NamedTuple):
    """What a worker needs to attach to a host tier (it travels to workers in a message)."""

    shm_name: str
    shm_token: bytes
    num_slots: int
    record_bytes: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pool_bytes(num_slots: int, record_bytes: int) -> int:
    """Bytes of the segment's pool holding num_slots slots of record_bytes each."""
    table = _round_up(num_slots * HEADER_BYTES, TABLE_ALIGN)
    return table + num_slots * _round_up(record_bytes, PAYLOAD_ALIGN)


def num_slots_for(capacity_bytes: int, record_bytes: int) -> int:
    """The most slots of record_bytes whose pool fits in capacity_bytes (kv.host_gb)."""
    num_slots = capacity_bytes // (HEADER_BYTES + _round_up(record_bytes, PAYLOAD_ALIGN))
    while num_slots > 0 and pool_bytes(num_slots, record_bytes) > capacity_bytes:
        num_slots -= 1
    return num_slots


def as_bytes(buffer, name: str) -> np.ndarray:
    """A flat uint8 view of a bytes-like object or a C-contiguous numpy array."""
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        return buffer.reshape(-1).view(np.uint8)
    return np.frombuffer(buffer, dtype=np.uint8)


class HostTier:
    """Block records in shared-memory slots; see the module doc for layout and protocol.

    `create` makes the owner's tier (index, policy, slot allocation); `attach` maps it in
    a worker, which may only `write`, `writing` and `read_into` the slots it was given.
    Out of slots (all being written) is a normal answer: `allocate` returns None.
    """

    def __init__(
        self, segment: SharedSegment, num_slots: int, record_bytes: int, policy: str | None
    ) -> None:
        self.segment = segment
        self.num_slots = num_slots
        self.record_bytes = record_bytes
        self.owner = segment.owner
        pool = segment.pool
        table = _round_up(num_slots * HEADER_BYTES, TABLE_ALIGN)
        stride = _round_up(record_bytes, PAYLOAD_ALIGN)
        self._headers = (
            pool[: num_slots * HEADER_BYTES].view(np.uint64).reshape(num_slots, HEADER_WORDS)
        )
        self._payloads = pool[table : table + num_slots * stride].reshape(num_slots, stride)
        if self.owner:
            self._policy = make_policy(policy)
            self._slots: dict[int, int] = {}  # committed: block hash -> slot
            self._pending: dict[int, int] = {}  # allocated, being written: hash -> slot
            self._stale: set[int] = set()  # pending blocks a clear() doomed
            self._free = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first

    @classmethod
    def create(
        cls, name: str, record_bytes: int, capacity_bytes: int, policy: str = "lru"
    ) -> HostTier:
        """The owner's tier: as many slots as fit in capacity_bytes, all empty."""
        if record_bytes < 1:
            raise ValueError(f"record_bytes must be >= 1, got {record_bytes}")
        make_policy(policy)  # an unknown name fails before the segment exists
        num_slots = num_slots_for(capacity_bytes, record_bytes)
        if num_slots < 1:
            raise ValueError(
                f"a host tier of {capacity_bytes} bytes (kv.host_gb) holds no block record "
                f"of {record_bytes} bytes"
            )
        # Not populated: a process maps the pages it touches (the owner, the slot
        # headers; a worker, the slots it reads and writes), not the whole tier.
        segment = SharedSegment.create(name, pool_bytes(num_slots, record_bytes), populate=False)
        return cls(segment, num_slots, record_bytes, policy)

    @classmethod
    def attach(cls, info: HostTierInfo) -> HostTier:
        """A worker's view of the owner's tier (FileNotFoundError / ValueError as
        SharedSegment.attach)."""
        segment = SharedSegment.attach(
            info.shm_name,
            info.shm_token,
            pool_bytes(info.num_slots, info.record_bytes),
            populate=False,
        )
        return cls(segment, info.num_slots, info.record_bytes, policy=None)

    @property
    def info(self) -> HostTierInfo:
        return HostTierInfo(
            self.segment.name, self.segment.token, self.num_slots, self.record_bytes
        )

    # ---- any process: the slots themselves ---------------------------------------------

    @contextlib.contextmanager
    def writing(self, slot: int, block_hash: int) -> Iterator[np.ndarray]:
        """The payload of `slot` to fill in place (e.g. pack_blocks(out=...)); on exit the
        slot is published as holding block_hash. An exception leaves it unreadable."""
        header = self._header(slot)
        gen = int(header[GEN])
        gen += gen % 2 == 0  # odd: readers from now on miss
        header[GEN] = gen
        payload = self._payloads[slot, : self.record_bytes]
        yield payload
        header[HASH] = block_hash
        header[LENGTH] = self.record_bytes
        header[CHECKSUM] = xxhash.xxh3_64_intdigest(payload)
        header[GEN] = gen + 1

    def write(self, slot: int, block_hash: int, payload) -> None:
        """Copy one block record (bytes-like or numpy, record_bytes long) into `slot`."""
        src = as_bytes(payload, "payload")
        if src.size != self.record_bytes:
            raise ValueError(f"payload holds {src.size} bytes, a block record {self.record_bytes}")
        with self.writing(slot, block_hash) as dst:
            np.copyto(dst, src)

    def read_into(self, slot: int, block_hash: int, out) -> bool:
        """Copy block_hash's record from `slot` into out (record_bytes, writable); False,
        with out undefined, when the slot does not hold that block intact."""
        header = self._header(slot)
        dst = as_bytes(out, "out")
        if dst.size != self.record_bytes:
            raise ValueError(f"out holds {dst.size} bytes, a block record {self.record_bytes}")
        before = header.copy()
        if (
            before[GEN] == 0
            or before[GEN] % 2
            or int(before[HASH]) != block_hash
            or before[LENGTH] != dst.size
        ):
            return False
        np.copyto(dst, self._payloads[slot, : self.record_bytes])
        if not np.array_equal(header, before):
            return False
        return xxhash.xxh3_64_intdigest(dst) == int(before[CHECKSUM])

    # ---- the owner: index, eviction, allocation ----------------------------------------

    def __len__(self) -> int:
        """Blocks held (committed)."""
        return len(self._slots)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slots

    def __iter__(self) -> Iterator[int]:
        """The hashes of the blocks held (committed)."""
        return iter(list(self._slots))

    def is_pending(self, block_hash: int) -> bool:
        """Whether block_hash has a slot being written (allocated, not yet committed)."""
        return block_hash in self._pending

    def allocate(self, block_hash: int, keep: Container[int] = ()) -> tuple[int, int | None] | None:
        """A slot for a writer to fill with block_hash, and the block evicted to free it
        (None if a slot was free). Never evicts a block in `keep`. None when every slot
        is being written or kept. block_hash must be neither held nor pending."""
        assert block_hash not in self._slots and block_hash not in self._pending, block_hash
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self._policy.victim(keep)
            if evicted is None:
                return None
            slot = self._slots.pop(evicted)
            self._policy.remove(evicted)
        self._pending[block_hash] = slot
        return slot, evicted

    def commit(self, block_hash: int) -> bool:
        """Publish a written slot in the index. False (and the slot freed) when its header
        does not name block_hash (the writer failed or never wrote), or when no slot was
        allocated for block_hash (a late or repeated commit)."""
        slot = self._pending.pop(block_hash, None)
        if slot is None:
            return False
        header = self._headers[slot]
        if (
            block_hash in self._stale
            or header[GEN] == 0
            or header[GEN] % 2
            or int(header[HASH]) != block_hash
        ):
            self._stale.discard(block_hash)
            self._release(slot)
            return False
        self._slots[block_hash] = slot
        self._policy.insert(block_hash)
        return True

    def abort(self, block_hash: int) -> None:
        """Give back a slot allocated for block_hash that will not be written (no-op when
        none was)."""
        self._stale.discard(block_hash)
        slot = self._pending.pop(block_hash, None)
        if slot is not None:
            self._release(slot)

    def lookup(self, block_hashes: Sequence[int]) -> list[int]:
        """Slots of the longest run of leading block_hashes held; each hit is touched."""
        slots = []
        for block_hash in block_hashes:
            slot = self._slots.get(block_hash)
            if slot is None:
                break
            self._policy.touch(block_hash)
            slots.append(slot)
        return slots

    def remove(self, block_hash: int) -> bool:
        """Drop a held block (its slot becomes unreadable and free); False if not held."""
        slot = self._slots.pop(block_hash, None)
        if slot is None:
            return False
        self._policy.remove(block_hash)
        self._release(slot)
        return True

    def clear(self) -> list[int]:
        """Drop every held block (e.g. new weights) and return their hashes; slots being
        written now will fail their commit."""
        dropped = list(self._slots)
        for block_hash in dropped:
            self.remove(block_hash)
        self._stale.update(self._pending)
        return dropped

    def close(self) -> None:
        """Unmap (and, the owner, unlink the segment). Closing twice is harmless."""
        self._headers = self._payloads = None
        self.segment.close()

    def _release(self, slot: int) -> None:
        header = self._headers[slot]
        gen = int(header[GEN])
        header[GEN] = gen + (gen % 2 == 0)  # odd: unreadable until rewritten
        self._free.append(slot)

    def _header(self, slot: int) -> np.ndarray:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be in [0, {self.num_slots}), got {slot}")
        return self._headers[slot]
