"""KV connectors: the engine's door to KV blocks kept outside its device pool.

The engine offloads a cached block when the pool evicts it, and onboards the blocks a
new request's prefix needs that the pool no longer holds. One step, with a connector:

    (arrival)    the worker prefetches the tiers' run for the prompt's blocks past the
                 device prefix, on its event loop (kvmesh.engine.prefetch)
    schedule()   allocate() evicts cached blocks      -> pool.take_evicted(): (hash, id)
                 admission: device hits, then lookup() of the full blocks after them,
                 answered from the prefetch (or a store in this process): never a wait
                 on another process; those get fresh blocks and count as computed
                 (batch.onboards)
    save()       pack every evicted block into a host slot, before anything overwrites it
    load()       per admitted run: read its records into one staging buffer, stopping at
                 the first failed read (its tokens and the rest's are computed instead),
                 and unpack those read into their device blocks in one call (one per
                 STAGING_BYTES of records); a run longer than the host tier is staged
                 in host slots a window at a time (below)
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

A cached prefix may be longer than the host tier has slots (a small host tier over a
large disk): a lookup returns the whole run, but only its first window staged in host
slots (kvmesh.cache.store); the rest come unstaged (Onboard.slot None) and count as
computed all the same. Load streams such a run through the host tier:

    hits      [ s s s s | - - - - | - - ]     s: in a host slot, -: unstaged
    load()    read 0-3 into their device blocks
              stage(4..)    the tiers promote the next window into host slots
              read 4-7,     stage(8..),   read 8-9

all before the step runs (the model reads every loaded block). Each window is read as
any other (generation and checksum: never another block's data), and a window that
cannot be staged (a block gone since, no slot to be had) stops the load there like a
failed read: the scheduler rewinds and the rest is computed. Staging a window may evict
from host the blocks just read (they are on disk too), never the step's other runs.

The host slots a lookup returns are not pinned until loaded, but this connector keeps
them from its own offloads and lookups: it remembers the hashes its lookups returned
since the last save (this step's runs, none loaded yet) and passes them as `keep` to
its reserves (so saving the step's evictions never evicts a block about to be loaded:
with no other slot to take, an evicted block is not offloaded instead) and to its later
lookups of the step (promoting from disk). At the save the set becomes the keep of the
step's loads (staging one run evicts none of the runs loaded after it), dropped at the
next save, so a run the scheduler cut is kept for that step only. Not covered: another
worker's offload or lookup (across processes), nor anything between a prefetch and the
admission that claims it (the lookup was answered then; it joins the kept set at
admission). Such a hit's read fails its generation/checksum check and the block is
computed: correct, but a lost hit.

Hashes. The engine names blocks by their full 128-bit hashes (kvmesh.kv.block_hash);
the tiers, here or in the cache actor, by their 64-bit wire hashes. So each record
begins with a tag, the full hash it was written for, and a load compares it before
unpacking: two blocks that share a wire hash are a miss, never each other's KV.

    record   [ full hash, 16 bytes | K and V of every layer, packed (pack_blocks) ]

The engine thread owns a connector and calls every method, synchronously; another
thread never touches it (the worker attaches and detaches the cache actor's host tier
through AsyncEngine.call). Two connectors share the slot copying (HostSlotConnector)
and differ in who owns the tiers:

    LocalTieredConnector   a TieredStore in this process (host DRAM, optionally disk),
                           asked at admission: the in-process Engine, `kvmesh bench tiers`
    CacheActorConnector    the node's cache actor (kvmesh.actors.cache) owns them;
                           lookups come prefetched with the request, staging a later
                           window and reserving slots are requests to it, the slots are
                           read and written here, in its shared memory. What a
                           cluster's workers use.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from kvmesh.cache.disk_tier import DiskTier
from kvmesh.cache.host_tier import HostTier
from kvmesh.cache.store import STORE_TIERS, Hit, TieredStore
from kvmesh.engine.prefetch import Prefetch, named
from kvmesh.gpu.kv_pack import pack_blocks, unpack_records
from kvmesh.gpu.model_config import RECORD_TAG_BYTES
from kvmesh.kv.block_hash import wire_hash, wire_hashes
from kvmesh.kv.segment import segment_name
from kvmesh.protocol import KVEvent, OnboardCounters, Tier

# A block found outside the pool: its hash, where it is now, and the tier it was found
# in (for the counters). The host slot of a TieredStore hit is all a worker needs to
# read it, in this process or (shared memory) in any other on the node.
Onboard = Hit

# Host memory a load stages at most: the records of a longer run are read and unpacked
# this many bytes at a time (2048 blocks of the tiny model, 32 of an 8B model's 2 MiB).
STAGING_BYTES = 64 << 20


class KVConnector(Protocol):
    """Where the engine offloads evicted blocks and onboards prefixes from.

    Block records are the block's full hash (RECORD_TAG_BYTES), then the block packed
    alone, [num_layers, 2, 1, block_size, num_kv_heads, head_dim] in the pool's dtype:
    `record_bytes` bytes in all (ModelConfig.kv_record_bytes). Hashes are full ones.
    """

    record_bytes: int

    def lookup(self, block_hashes: list[int], prefetched: Prefetch | None = None) -> list[Onboard]:
        """The longest leading run of block_hashes held outside the device pool (its
        blocks past the first window the host tier holds unstaged: slot None), as
        `prefetched` answered it (the tiers asked when the request arrived,
        kvmesh.engine.prefetch) or, for tiers in this process, asked now. Never waits on
        another process."""

    def load(
        self, hits: Sequence[Onboard], block_ids: Sequence[int], kv_caches: list[torch.Tensor]
    ) -> int:
        """Copy hits[i] into block block_ids[i], in order, staging the unstaged ones a
        window at a time; how many leading ones made it (the first failed read, checksum
        or staging stops it)."""

    def save(self, evicted: Sequence[tuple[int, int]], kv_caches: list[torch.Tensor]) -> None:
        """Offload (block hash, block id) pairs the pool is about to overwrite."""

    def take_events(self) -> list[KVEvent]:
        """KV events of tiers this connector owns (tier "host" / "disk") since the last
        call; none where another process owns them and publishes its own."""

    def metrics(self) -> dict[Tier, OnboardCounters]:
        """What this connector onboarded and what failed at load, per tier."""

    def close(self) -> None:
        """Release what the connector holds (shared memory it created)."""


class HostSlotConnector:
    """load/save by copying block records through host-tier slots; subclasses say where
    the slots come from (`_find`, `_stage`, `_reserve`, `_finish`) and which tier they
    are in (`host`, None while there is none: every lookup misses, nothing is saved).

    Counters per tier it keeps itself (`metrics`, protocol.OnboardCounters): onboarded
    (loaded into the device pool, by the tier they were found in) and failed (found, but
    their read failed its checks at load: overwritten or corrupted since; recomputed).
    The tiers count the rest (what they stored and served), each in its own store.
    """

    host: HostTier | None

    def __init__(self, record_bytes: int) -> None:
        if record_bytes <= RECORD_TAG_BYTES:
            raise ValueError(
                f"record_bytes must exceed the {RECORD_TAG_BYTES}-byte tag, got {record_bytes}"
            )
        self.record_bytes = record_bytes
        self.num_onboarded = dict.fromkeys(STORE_TIERS, 0)
        self.num_failed = dict.fromkeys(STORE_TIERS, 0)
        # wire hashes (they go to the tiers as `keep`):
        self._unloaded: set[int] = set()  # looked up since the last save, not loaded
        self._loading: set[int] = set()  # looked up before the last save, not loaded
        # host slots -> device blocks, one record a row; grown to the longest run loaded,
        # up to STAGING_BYTES
        self._staging = torch.empty((0, record_bytes), dtype=torch.uint8)

    def lookup(self, block_hashes: list[int], prefetched: Prefetch | None = None) -> list[Onboard]:
        if self.host is None or not block_hashes:
            return []
        hits = self._find(block_hashes, prefetched)
        self._unloaded.update(wire_hashes(hit.block_hash for hit in hits))
        return hits

    def load(
        self, hits: Sequence[Onboard], block_ids: Sequence[int], kv_caches: list[torch.Tensor]
    ) -> int:
        assert len(hits) == len(block_ids), (len(hits), len(block_ids))
        run = [hit.block_hash for hit in hits]
        self._unloaded.difference_update(wire_hashes(run))
        self._loading.difference_update(wire_hashes(run))
        hits = list(hits)
        tiers = [hit.tier for hit in hits]  # as looked up: a block may go before staged
        keep = list(self._loading | self._unloaded)  # the step's other runs
        chunk = max(STAGING_BYTES // self.record_bytes, 1)
        num_loaded = 0
        while num_loaded < len(run):
            if num_loaded < len(hits) and hits[num_loaded].slot is None:
                # the host had no room for it at lookup: stage the next window now; the
                # run comes back shorter when a block of it went since
                rest = run[num_loaded:]
                hits[num_loaded:] = named(self._stage(wire_hashes(rest), keep), rest)
            some = list(
                itertools.takewhile(
                    lambda hit: hit.slot is not None, hits[num_loaded : num_loaded + chunk]
                )
            )
            if not some:  # went since lookup, or still no slot to stage it in
                self.num_failed[tiers[num_loaded]] += 1
                break
            num_read = self._load_some(
                some, block_ids[num_loaded : num_loaded + len(some)], kv_caches
            )
            num_loaded += num_read
            if num_read < len(some):
                break
        return num_loaded

    def metrics(self) -> dict[Tier, OnboardCounters]:
        """Per tier, the blocks found there that this connector loaded, and that failed."""
        return {
            tier: OnboardCounters(onboarded=self.num_onboarded[tier], failed=self.num_failed[tier])
            for tier in STORE_TIERS
        }

    def save(self, evicted: Sequence[tuple[int, int]], kv_caches: list[torch.Tensor]) -> None:
        # the runs this step looked up load after this save: evict none of them, here nor
        # while staging them; the set is dropped at the next save, so a run cut or never
        # admitted is kept for this step only
        self._loading, self._unloaded = self._unloaded, set()
        keep = list(self._loading)
        host = self.host
        if host is None or not evicted:
            return
        slots = self._reserve(wire_hashes(block_hash for block_hash, _ in evicted), keep)
        on_cpu = kv_caches[0].device.type == "cpu"
        written: list[int] = []
        todo = [
            (block_hash, block_id, slot)
            for (block_hash, block_id), slot in zip(evicted, slots, strict=True)
            if slot is not None
        ]
        try:
            for block_hash, block_id, slot in todo:
                with host.writing(slot, wire_hash(block_hash)) as payload:
                    payload[:RECORD_TAG_BYTES] = np.frombuffer(_tag(block_hash), np.uint8)
                    out = torch.from_numpy(payload[RECORD_TAG_BYTES:])
                    if on_cpu:
                        pack_blocks(kv_caches, [block_id], out=out)
                    else:  # pack on the device, then one copy to the host slot
                        out.copy_(pack_blocks(kv_caches, [block_id]).view(-1).view(torch.uint8))
                written.append(wire_hash(block_hash))
        finally:  # slots not written (an exception midway) are given back
            self._finish(written, wire_hashes(h for h, _, _ in todo[len(written) :]))

    def _load_some(
        self, hits: Sequence[Onboard], block_ids: Sequence[int], kv_caches: list[torch.Tensor]
    ) -> int:
        # read_into checks generation and checksum after its copy, and the tag names the
        # full hash, so a record is unpacked only once known intact and this block's: a
        # slot rewritten since lookup, or another block's under the same wire hash, is a
        # miss.
        host = self.host
        device = kv_caches[0].device
        staging = self._staging_for(len(hits), device)
        rows = staging.numpy()
        num_read = 0
        for hit in hits:
            row = rows[num_read]
            if (
                host is None
                or not host.read_into(hit.slot, wire_hash(hit.block_hash), row)
                or row[:RECORD_TAG_BYTES].tobytes() != _tag(hit.block_hash)
            ):
                self.num_failed[hit.tier] += 1
                break
            num_read += 1
        if num_read:
            records = staging[:num_read, RECORD_TAG_BYTES:].to(device).contiguous()
            unpack_records(records.view(-1), kv_caches, block_ids[:num_read])
            for hit in hits[:num_read]:
                self.num_onboarded[hit.tier] += 1
        return num_read

    def _staging_for(self, num_records: int, device: torch.device) -> torch.Tensor:
        """The staging buffer, at least num_records rows; page-locked when loading to a
        GPU, so the run crosses in one DMA copy."""
        staging = self._staging
        pin = device.type == "cuda"
        if len(staging) < num_records or (pin and not staging.is_pinned()):
            staging = torch.empty(
                (max(num_records, len(staging)), self.record_bytes),
                dtype=torch.uint8,
                pin_memory=pin,
            )
            self._staging = staging
        return staging[:num_records]

    def _find(self, block_hashes: list[int], prefetched: Prefetch | None) -> list[Onboard]:
        """The leading run held (full hashes), its first window staged evicting none of
        `_unloaded`: from `prefetched`, or asked now."""
        raise NotImplementedError

    def _stage(self, block_hashes: list[int], keep: list[int]) -> list[Onboard]:
        """The unstaged rest of a looked-up run: the leading run of block_hashes still
        held, its first window staged (uncounted), evicting none of `keep`."""
        raise NotImplementedError

    def _reserve(self, block_hashes: list[int], keep: list[int]) -> list[int | None]:
        """A slot (or None) per hash, evicting none of `keep` (hits not yet loaded)."""
        raise NotImplementedError

    def _finish(self, committed: list[int], aborted: list[int]) -> None:
        raise NotImplementedError

    def take_events(self) -> list[KVEvent]:
        return []

    def close(self) -> None:
        pass


def _tag(block_hash: int) -> bytes:
    return block_hash.to_bytes(RECORD_TAG_BYTES, "little")


class LocalTieredConnector(HostSlotConnector):
    """KVConnector over a TieredStore in this process: a host tier it creates (shared
    memory, `host_bytes`) over an optional disk tier (`disk_dir`, `disk_bytes`).

    Offloading a block already held in either tier copies nothing. Counters per tier:
    this connector's onboarded and failed (`metrics`, see HostSlotConnector), and the
    store's offloaded, lookups, hits and evicted (`store.counters()`).
    """

    def __init__(
        self,
        record_bytes: int,
        host_bytes: int,
        disk_dir: str | os.PathLike | None = None,
        disk_bytes: int = 0,
        policy: str = "lru",
        fingerprint: str = "",
        objects=None,  # an ObjectTier behind the disk (kvmesh.cache.object_tier), owned
    ) -> None:
        super().__init__(record_bytes)
        host = HostTier.create(segment_name("kv-connector"), record_bytes, host_bytes, policy)
        try:
            disk = (
                None
                if disk_dir is None
                else DiskTier(disk_dir, record_bytes, disk_bytes, policy, fingerprint)
            )
        except BaseException:
            host.close()
            raise
        self.store = TieredStore(host, disk, objects)
        self.host = host

    def _find(self, block_hashes: list[int], prefetched: Prefetch | None) -> list[Onboard]:
        # The store is in this process: asked now, at no wait, so a prefetch is never
        # made for it. Promoting from disk must not evict the runs this step looked up.
        return named(
            self.store.get_leading(wire_hashes(block_hashes), self._unloaded), block_hashes
        )

    def _stage(self, block_hashes: list[int], keep: list[int]) -> list[Onboard]:
        return self.store.stage(block_hashes, keep)

    def _reserve(self, block_hashes: list[int], keep: list[int]) -> list[int | None]:
        kept = frozenset(keep)
        return [self.store.reserve(block_hash, kept) for block_hash in block_hashes]

    def _finish(self, committed: list[int], aborted: list[int]) -> None:
        for block_hash in committed:
            self.store.commit(block_hash)
        for block_hash in aborted:
            self.store.abort(block_hash)

    def take_events(self) -> list[KVEvent]:
        """The store's KV events (tier "host" / "disk") since the last call."""
        return self.store.take_events()

    def close(self) -> None:
        """Unlink the host tier's shared memory (the disk tier's files stay)."""
        self.store.close()


class CacheChannel(Protocol):
    """The worker's line to its node's cache actor, called from the engine thread; each
    call blocks until answered. Any failure (cache actor dead, timeout) is an empty
    answer: no hits, no slots. (Lookups are not among them: they are prefetched.)"""

    def stage(self, block_hashes: list[int], keep: list[int]) -> tuple[list[Onboard], str]:
        """The unstaged rest of a run looked up before (TieredStore.stage: not counted
        again), its first window staged evicting none of `keep`, and the shm name of
        the segment it is in."""

    def reserve(self, block_hashes: list[int], keep: list[int]) -> tuple[list[int | None], str]:
        """A slot (or None) per hash, evicting none of `keep`, and the shm name of the
        segment they are in."""

    def finish(self, committed: list[int], aborted: list[int]) -> None:
        """Tell the cache which reserved slots were written (one-way, does not wait)."""


class CacheActorConnector(HostSlotConnector):
    """KVConnector over the node's cache actor (see the module doc). Lookups come
    prefetched with the request; `host` (the cache's host tier, mapped by name) is
    attached and detached on the engine thread, like every other call here (the worker
    runs them through AsyncEngine.call). Answers that name another segment than
    `host`'s are misses.

    The tiers' own counters (offloaded, lookups, hits, evicted) are the cache actor's;
    this connector counts what it onboarded and what failed at load.
    """

    def __init__(self, record_bytes: int, channel: CacheChannel) -> None:
        super().__init__(record_bytes)
        self.channel = channel
        self.host: HostTier | None = None

    def attach(self, host: HostTier) -> None:
        """Use the cache actor's host tier, mapped by the worker (a restarted cache
        actor's replaces its predecessor's)."""
        self.detach()
        self.host = host

    def detach(self) -> None:
        """The cache actor died: every lookup misses and nothing is saved until one is
        attached again. Engine thread, between steps: nothing reads the old mapping."""
        if self.host is not None:
            self.host.close()
            self.host = None

    def _find(self, block_hashes: list[int], prefetched: Prefetch | None) -> list[Onboard]:
        if prefetched is None or not self._current(prefetched.shm_name):
            return []
        return prefetched.run(block_hashes)

    def _stage(self, block_hashes: list[int], keep: list[int]) -> list[Onboard]:
        hits, shm_name = self.channel.stage(block_hashes, keep)
        return hits if self._current(shm_name) else []

    def _reserve(self, block_hashes: list[int], keep: list[int]) -> list[int | None]:
        slots, shm_name = self.channel.reserve(block_hashes, keep)
        if self._current(shm_name):
            return slots
        reserved = [h for h, slot in zip(block_hashes, slots, strict=False) if slot is not None]
        if reserved:
            self.channel.finish([], reserved)
        return [None] * len(block_hashes)

    def _finish(self, committed: list[int], aborted: list[int]) -> None:
        if committed or aborted:
            self.channel.finish(committed, aborted)

    def _current(self, shm_name: str) -> bool:
        return self.host is not None and self.host.segment.name == shm_name
