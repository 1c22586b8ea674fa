"""TieredStore: the cache actor's tiers, host DRAM (shared memory) over disk over objects.

    worker ──reserve, write slot, commit──► host ──evicted: demote──► disk ──evicted: deleted
    worker ◄──get_leading, read slots────── host ◄──disk hit: promote── disk
                                             │ ▲
        object_write "demoted": put as it ───┘ └── object hit: promote (parallel GETs)
        leaves host; "evicted": as it leaves      object tier (an S3 bucket, optional)
        the last local tier (disk, else host)

Offload: a worker evicting a cached device block asks for a host slot (`reserve`), packs
the block into it and reports back (`commit`). A full host evicts its policy's victim
and demotes it to disk (copied from its slot before the slot is handed out); a full disk
deletes its own victim. A block already held in either tier is not written again.

Onboard: `get_leading` walks a request's hashes (those the device lacks) and returns
the longest leading run held in either tier, the blocks of its first window staged in
host slots: a disk hit is promoted, read (checksum and all) into a host slot, and stays
on disk too, so a later eviction from host costs no write. The walk stops at the first
block held nowhere, and at a disk block that fails its checks as it is staged (deleted,
a miss). Workers read only host slots, one path for both tiers.

A run may be longer than the host tier has slots: it is staged a window at a time.

    run       [ d0 d1 h2 d3 | d4 h5 d6 d7 | d8 d9 ]        d: on disk, h: in host
    call 1    [ s  s  s  s  | -  -  -  -  | -  - ]  get_leading: slots for the window
    call 2                  [ s  s  s  s  | -  - ]  stage(the rest), once 0-3 are read
    call 3                                [ s  s ]  stage(the rest)
              s: staged (Hit.slot), -: held, not staged yet (Hit.slot None)

A window is at most host.num_slots blocks; staging stops early at a block no slot can be
had for (every slot kept or being written): that block and the rest come unstaged, to
be staged by a later `stage` call, when the worker has read the window before them
(kvmesh.engine.kv_connector). While a window is staged its blocks are kept from host
eviction, so promoting one never evicts another; the run's later blocks are not (a
block of theirs in host may go: to disk, found there by its own window; dropped, a lost
hit, when the disk has no room), but the whole run is kept from disk eviction, so what
the walk found on disk stays there. `get_leading` counts the whole run in the tiers'
stats; `stage` counts nothing (counted once). Both take a `keep` that is never evicted,
from either tier, and so does `reserve`: a worker's hits not yet loaded (looked up in
the same step as the evictions it offloads).

Every change is a KV event with its tier (BlockStored / BlockRemoved / AllBlocksCleared),
and per tier the store counts (protocol.TierCounters): offloaded (blocks stored into it:
host from workers, disk demoted from host), lookups (blocks looked up in it by
get_leading; the disk is asked for those the host lacked), hits (those found there:
served to the lookup; whether a worker then loads them is its connector's count) and
evicted.

The object tier (kvmesh.cache.object_tier) is the last: a block missing from host and disk
is looked up there, and a run's object blocks in the window being staged are fetched all
at once (parallel GETs), checked, and promoted into host slots like disk hits; a failed
or corrupt fetch ends the run there (a miss). Its writes run in the background: a block
is counted offloaded, and its BlockStored event sent, once its PUT finished. Its counters
are those of the disk tier, lookups being those host and disk lacked; it evicts nothing
(the bucket's lifecycle rules do), and `clear` stops using it (its keys carry the model
fingerprint, which new weights loaded in place do not change).

One thread drives a store: the cache actor's. Disk I/O blocks, so an asyncio actor
calls it off its event loop (asyncio.to_thread), one call at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Container, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, get_args

import numpy as np

from kvmesh.cache.disk_tier import DiskTier
from kvmesh.cache.host_tier import HostTier
from kvmesh.cache.object_tier import ObjectTier
from kvmesh.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    Tier,
    TierCounters,
)

STORE_TIERS: tuple[Tier, ...] = get_args(Tier)


class Hit(NamedTuple):
    """A block of a leading run: the host slot it is in now (None: held, not staged yet;
    see the module doc), and the tier it was found in."""

    block_hash: int
    slot: int | None
    tier: Tier


@dataclass
class TierStats:
    """Block counts of one tier since the store started, as they grow; TierCounters'
    fields (see the module doc)."""

    offloaded: int = 0
    lookups: int = 0
    hits: int = 0
    evicted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def counters(self) -> TierCounters:
        return TierCounters(**asdict(self))


OBJECT_WRITES = ("demoted", "evicted")


class TieredStore:
    """Host tier over an optional disk tier over an optional object tier; owns them all.
    See the module doc."""

    def __init__(
        self,
        host: HostTier,
        disk: DiskTier | None = None,
        objects: ObjectTier | None = None,
        object_write: str = "demoted",
    ) -> None:
        assert host.owner, "a TieredStore owns its host tier (HostTier.create)"
        for name, tier in (("disk", disk), ("object", objects)):
            if tier is not None and tier.record_bytes != host.record_bytes:
                raise ValueError(
                    f"{name} tier records are {tier.record_bytes} bytes, host tier "
                    f"records {host.record_bytes}"
                )
        if object_write not in OBJECT_WRITES:
            raise ValueError(
                f"kv.object_write must be one of {', '.join(OBJECT_WRITES)}, got {object_write!r}"
            )
        self.host = host
        self.disk = disk
        self.objects = objects
        self.object_write = object_write
        self.stats = {tier: TierStats() for tier in STORE_TIERS}
        # staging for disk -> host (promote) and host -> disk (demote, inside a promote)
        self._promoting = np.empty(host.record_bytes, dtype=np.uint8)
        self._demoting = np.empty(host.record_bytes, dtype=np.uint8)
        self._events: list[tuple[type, str, list[int]]] = []  # (kind, tier, hashes)

    def tier_of(self, block_hash: int) -> str | None:
        """The fastest tier holding block_hash (committed), or None."""
        if block_hash in self.host:
            return "host"
        if self.disk is not None and block_hash in self.disk:
            return "disk"
        if self.objects is not None and block_hash in self.objects and self.objects.available:
            return "object"
        return None

    def __contains__(self, block_hash: int) -> bool:
        return self.tier_of(block_hash) is not None

    def counters(self) -> dict[Tier, TierCounters]:
        """What each tier it has counted (the tiers it has only)."""
        self._collect_objects()
        has = {"host": True, "disk": self.disk is not None, "object": self.objects is not None}
        return {tier: stats.counters() for tier, stats in self.stats.items() if has[tier]}

    def held(self, tier: str, limit: int | None = None) -> list[int]:
        """The block hashes `tier` holds (committed), at most `limit` of them."""
        if tier not in STORE_TIERS:
            raise ValueError(f"tier {tier!r}: expected one of {STORE_TIERS}")
        blocks = {"host": self.host, "disk": self.disk, "object": self.objects}[tier]
        return list(itertools.islice(blocks if blocks is not None else (), limit))

    # ---- offload ----------------------------------------------------------------------

    def reserve(self, block_hash: int, keep: Container[int] = ()) -> int | None:
        """A host slot for a worker to write block_hash into, then `commit` (or `abort`).
        Never evicts a block in `keep` (the worker's hits it has yet to load). None when
        there is nothing to write (already held, or being written) or no slot can be had
        (every one is being written or kept)."""
        if self.host.is_pending(block_hash) or block_hash in self.host:
            return None
        if self.disk is not None and block_hash in self.disk:
            self.disk.touch(block_hash)
            return None
        return self._allocate(block_hash, keep)

    def commit(self, block_hash: int) -> bool:
        """The worker wrote its reserved slot: publish it. False when the slot does not
        hold the block (the write failed or the store was cleared meanwhile)."""
        if not self.host.commit(block_hash):
            return False
        self.stats["host"].offloaded += 1
        self._event(BlockStored, "host", block_hash)
        return True

    def abort(self, block_hash: int) -> None:
        """The worker will not write its reserved slot."""
        self.host.abort(block_hash)

    def put(self, block_hash: int, payload) -> bool:
        """reserve + write + commit in this process; False when nothing was stored."""
        slot = self.reserve(block_hash)
        if slot is None:
            return False
        self.host.write(slot, block_hash, payload)
        return self.commit(block_hash)

    # ---- onboard ----------------------------------------------------------------------

    def get_leading(self, block_hashes: Sequence[int], keep: Iterable[int] = ()) -> list[Hit]:
        """The longest leading run of block_hashes held in either tier, counted in the
        tiers' stats; its first window staged in host slots, the rest unstaged (see the
        module doc). Evicts no block of `keep` (runs the caller looked up before and has
        yet to load)."""
        hits = self.stage(block_hashes, keep)
        num_host = sum(hit.tier == "host" for hit in hits)
        num_disk = sum(hit.tier == "disk" for hit in hits)
        self._count("host", len(block_hashes), num_host)
        if self.disk is not None:
            self._count("disk", len(block_hashes) - num_host, num_disk)
        if self.objects is not None:
            self._count(
                "object", len(block_hashes) - num_host - num_disk, len(hits) - num_host - num_disk
            )
        return hits

    def stage(self, block_hashes: Sequence[int], keep: Iterable[int] = ()) -> list[Hit]:
        """get_leading, uncounted: for the unstaged rest of a run it returned, once the
        blocks before them are read. The run comes back shorter when a block of it went
        since (a miss, as any failed read)."""
        found = []
        for block_hash in block_hashes:
            tier = self.tier_of(block_hash)
            if tier is None:
                break
            found.append((block_hash, tier))
        window = self.host.num_slots
        keep = set(keep)
        host_keep = keep.union(block_hash for block_hash, _ in found[:window])
        disk_keep = keep.union(block_hash for block_hash, _ in found)
        fetched = self._fetch_objects([h for h, tier in found[:window] if tier == "object"])
        hits: list[Hit] = []
        staging = True
        for block_hash, tier in found:
            slot = None
            staging = staging and len(hits) < window
            if staging and tier == "host":
                slot = self.host.lookup([block_hash])[0]
            elif staging:
                if not self._fetch(block_hash, tier, fetched):
                    break
                slot = self._promote(block_hash, host_keep, disk_keep)
                staging = slot is not None
            hits.append(Hit(block_hash, slot, tier))
        return hits

    # ---- all tiers --------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every block (e.g. new weights): nothing held before comes back."""
        self.host.clear()
        self._events.append((AllBlocksCleared, "host", []))
        if self.disk is not None:
            self.disk.clear()
            self._events.append((AllBlocksCleared, "disk", []))
        if self.objects is not None:  # see the module doc
            self.objects.close()
            self.objects = None
            self._events.append((AllBlocksCleared, "object", []))

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first; runs of one kind and tier merged
        (the object tier's: its puts finished and its blocks found gone, since)."""
        self._collect_objects()
        events, self._events = self._events, []
        return [
            kind(tier=tier) if kind is AllBlocksCleared else kind(block_hashes=hashes, tier=tier)
            for kind, tier, hashes in events
        ]

    def close(self) -> None:
        """Unlink the host tier's shared memory, stop the disk tier's helper thread (its
        block files stay) and finish the object tier's queued writes."""
        self.host.close()
        if self.disk is not None:
            self.disk.close()
        if self.objects is not None:
            self.objects.close()

    # ---- inside ----------------------------------------------------------------------

    def _allocate(
        self, block_hash: int, keep: Container[int], disk_keep: Container[int] | None = None
    ) -> int | None:
        """A host slot for block_hash, demoting the block evicted for it; no block of
        `keep` is evicted from host, nor of `disk_keep` (default: keep) from disk."""
        got = self.host.allocate(block_hash, keep)
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None:
            self._demote(evicted, slot, keep if disk_keep is None else disk_keep)
        return slot

    def _demote(self, block_hash: int, slot: int, keep: Container[int]) -> None:
        """block_hash left the host (still readable in slot): copy it to disk, and to the
        object tier (see the module doc)."""
        self.stats["host"].evicted += 1
        self._event(BlockRemoved, "host", block_hash)
        objects = self.objects
        if self.disk is None and objects is None:
            return
        if self.disk is not None and block_hash in self.disk:
            self.disk.touch(block_hash)
            return
        write_object = objects is not None and (self.disk is None or self.object_write == "demoted")
        if write_object and block_hash in objects:
            write_object = False
            if self.disk is None:
                return  # held in the bucket already: nothing to copy
        if not self.host.read_into(slot, block_hash, self._demoting):
            return  # not intact in its slot: dropped, not demoted
        if write_object:
            objects.put(block_hash, self._demoting)
        if self.disk is None:
            return
        if objects is not None and self.object_write == "evicted":
            self._write_back(keep)
        stored, evicted = self.disk.write(block_hash, self._demoting, keep)
        for dropped in evicted:
            self.stats["disk"].evicted += 1
            self._event(BlockRemoved, "disk", dropped)
        if stored:
            self.stats["disk"].offloaded += 1
            self._event(BlockStored, "disk", block_hash)

    def _write_back(self, keep: Container[int]) -> None:
        """object_write "evicted": a full disk's victim goes to the object tier as it is
        evicted (read back from its file first: checked, a corrupt one is only dropped)."""
        while len(self.disk) >= self.disk.num_files:
            victim = self.disk.victim(keep)
            if victim is None:
                return
            if victim not in self.objects and self.disk.read_into(victim, self._promoting):
                self.objects.put(victim, self._promoting)
            self.disk.remove(victim)
            self.stats["disk"].evicted += 1
            self._event(BlockRemoved, "disk", victim)

    def _fetch_objects(self, block_hashes: list[int]) -> dict[int, object]:
        """The object tier's records of block_hashes, fetched in parallel; misses absent."""
        if not block_hashes:
            return {}
        records = self.objects.get_many(block_hashes)
        return {h: r for h, r in zip(block_hashes, records, strict=True) if r is not None}

    def _fetch(self, block_hash: int, tier: str, fetched: dict[int, object]) -> bool:
        """Put a disk or object block into the promotion buffer; False (a miss) if it
        fails its checks. Read before a slot is allocated, so a corrupt block evicts
        nothing."""
        if tier == "object":
            record = fetched.get(block_hash)
            if record is None:
                return False
            np.copyto(self._promoting, record)
            return True
        if self.disk.read_into(block_hash, self._promoting):
            return True
        if block_hash not in self.disk:  # the failed read deleted it
            self._event(BlockRemoved, "disk", block_hash)
        return False

    def _promote(
        self, block_hash: int, keep: Container[int], disk_keep: Container[int]
    ) -> int | None:
        """Copy the fetched block into a host slot; None when no slot can be had."""
        slot = self._allocate(block_hash, keep, disk_keep)
        if slot is None:
            return None
        self.host.write(slot, block_hash, self._promoting)
        committed = self.host.commit(block_hash)
        assert committed, f"promoted block {block_hash:016x} did not commit to slot {slot}"
        self._event(BlockStored, "host", block_hash)
        return slot

    def _collect_objects(self) -> None:
        """The object tier's writes finished and blocks found gone since the last call:
        counted, and queued as events."""
        if self.objects is None:
            return
        for block_hash in self.objects.take_stored():
            self.stats["object"].offloaded += 1
            self._event(BlockStored, "object", block_hash)
        for block_hash in self.objects.take_removed():
            self._event(BlockRemoved, "object", block_hash)

    def _count(self, tier: str, queries: int, hits: int) -> None:
        self.stats[tier].lookups += queries
        self.stats[tier].hits += hits

    def _event(self, kind: type, tier: str, block_hash: int) -> None:
        if self._events and self._events[-1][:2] == (kind, tier):
            self._events[-1][2].append(block_hash)
        else:
            self._events.append((kind, tier, [block_hash]))
