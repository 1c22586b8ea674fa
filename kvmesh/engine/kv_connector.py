"""KV connectors: the engine's door to KV blocks kept outside its device pool.

The engine offloads a cached block when the pool evicts it, and onboards the blocks a
new request's prefix needs that the pool no longer holds. One step, with a connector:

    schedule()   allocate() evicts cached blocks      -> pool.take_evicted(): (hash, id)
                 admission: device hits, then lookup() of the full blocks after them;
                 those get fresh blocks and count as computed (batch.onboards)
    save()       pack every evicted block into a host slot, before anything overwrites it
    load()       per admitted run: copy block after block into its device block; stop at
                 the first failed read (its tokens and the rest's are computed instead)
    run()        the model writes the step's tokens, into evicted blocks too

Offload on eviction, not write-through: a block is copied out only when the device is
about to lose it, so the steps that only hit the device prefix cache (most of them)
cost nothing, and the host tier fills with what the device lost rather than with
copies of what it still holds. The price: the copy sits in the step that evicts (one
block record per evicted block, small next to recomputing it), and a block never
evicted is not in the host tier for other workers of the node, nor after a crash.

Saving comes before loading: the blocks a load fills may be the very ones this
schedule evicted. Loads happen in the engine, not in the scheduler, so the scheduler
stays free of tensors and the connector may later run them asynchronously; a failed
load is reported back and the scheduler rewinds (as vLLM's KV connectors do).

The host slots a lookup returns are not pinned until loaded: the same step's save (or,
across processes, another worker's offload) may evict one first. The read then fails
its generation/checksum check and the block is computed: correct, but a lost hit, so
the host tier should hold a step's onboarded run plus its evictions many times over.

The engine thread calls every method, synchronously. LocalTieredConnector keeps the
blocks in this process (a TieredStore: host DRAM, optionally disk); a connector backed
by the node's cache actor implements the same protocol.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from kvmesh.cache.disk_tier import DiskTier
from kvmesh.cache.host_tier import HostTier
from kvmesh.cache.store import STORE_TIERS, Hit, TieredStore
from kvmesh.gpu.kv_pack import pack_blocks, unpack_blocks
from kvmesh.protocol import KVEvent
from kvmesh.transport import shm

# A block found outside the pool: its hash, where it is now, and the tier it was found
# in (for the counters). The host slot of a TieredStore hit is all a worker needs to
# read it, in this process or (shared memory) in any other on the node.
Onboard = Hit


class KVConnector(Protocol):
    """Where the engine offloads evicted blocks and onboards prefixes from.

    Block records are one block packed alone, [num_layers, 2, 1, block_size,
    num_kv_heads, head_dim] in the pool's dtype: `record_bytes` bytes.
    """

    record_bytes: int

    def lookup(self, block_hashes: list[int]) -> list[Onboard]:
        """The longest leading run of block_hashes held outside the device pool."""

    def load(self, hits: Sequence[Onboard], block_ids: Sequence[int],
             kv_caches: list[torch.Tensor]) -> int:
        """Copy hits[i] into block block_ids[i], in order; how many leading ones made it
        (the first failed read or checksum stops it)."""

    def save(self, evicted: Sequence[tuple[int, int]], kv_caches: list[torch.Tensor]) -> None:
        """Offload (block hash, block id) pairs the pool is about to overwrite."""


class LocalTieredConnector:
    """KVConnector over a TieredStore in this process: a host tier it creates (shared
    memory, `host_bytes`) over an optional disk tier (`disk_dir`, `disk_bytes`).

    Offloading a block already held in either tier copies nothing. Counters per tier
    (`metrics`): offloaded (blocks stored into it: host from this engine, disk demoted
    from host), lookups (blocks looked up in it), hits (found there), onboarded (loaded
    into the device pool, by the tier they were found in) and failed (found, but their
    read failed its checks at load: overwritten or corrupted since; recomputed).
    """

    def __init__(self, record_bytes: int, host_bytes: int,
                 disk_dir: str | os.PathLike | None = None, disk_bytes: int = 0,
                 policy: str = "lru") -> None:
        host = HostTier.create(shm.segment_name("kv-connector"), record_bytes, host_bytes, policy)
        try:
            disk = None if disk_dir is None else DiskTier(disk_dir, record_bytes, disk_bytes,
                                                          policy)
        except BaseException:
            host.close()
            raise
        self.store = TieredStore(host, disk)
        self.record_bytes = record_bytes
        self.num_onboarded = dict.fromkeys(STORE_TIERS, 0)
        self.num_failed = dict.fromkeys(STORE_TIERS, 0)
        self._staging = np.empty(record_bytes, dtype=np.uint8)  # host slot -> device block

    def lookup(self, block_hashes: list[int]) -> list[Onboard]:
        return self.store.get_leading(block_hashes)

    def load(self, hits: Sequence[Onboard], block_ids: Sequence[int],
             kv_caches: list[torch.Tensor]) -> int:
        # read_into checks generation and checksum after its copy, so the staging buffer
        # is unpacked only once known intact: a slot rewritten since lookup is a miss.
        device = kv_caches[0].device
        staging = torch.from_numpy(self._staging)
        for num_loaded, (hit, block_id) in enumerate(zip(hits, block_ids, strict=True)):
            if not self.store.host.read_into(hit.slot, hit.block_hash, self._staging):
                self.num_failed[hit.tier] += 1
                return num_loaded
            unpack_blocks(staging.to(device), kv_caches, [block_id])  # no copy on CPU
            self.num_onboarded[hit.tier] += 1
        return len(hits)

    def save(self, evicted: Sequence[tuple[int, int]], kv_caches: list[torch.Tensor]) -> None:
        host = self.store.host
        on_cpu = kv_caches[0].device.type == "cpu"
        for block_hash, block_id in evicted:
            slot = self.store.reserve(block_hash)
            if slot is None:  # held already, or no slot free of writers
                continue
            try:
                with host.writing(slot, block_hash) as payload:
                    out = torch.from_numpy(payload)
                    if on_cpu:
                        pack_blocks(kv_caches, [block_id], out=out)
                    else:  # pack on the device, then one copy to the host slot
                        out.copy_(pack_blocks(kv_caches, [block_id]).view(-1).view(torch.uint8))
            except BaseException:
                self.store.abort(block_hash)
                raise
            self.store.commit(block_hash)

    def metrics(self) -> dict[str, dict[str, int]]:
        """Counters per tier ("host", "disk"); see the class doc."""
        return {
            tier: {"offloaded": stats.offloaded, "lookups": stats.queries,
                   "hits": stats.onboarded, "onboarded": self.num_onboarded[tier],
                   "failed": self.num_failed[tier]}
            for tier, stats in self.store.stats.items()
        }

    def take_events(self) -> list[KVEvent]:
        """The store's KV events (tier "host" / "disk") since the last call."""
        return self.store.take_events()

    def close(self) -> None:
        """Unlink the host tier's shared memory (the disk tier's files stay)."""
        self.store.close()
