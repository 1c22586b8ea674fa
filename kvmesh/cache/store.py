"""TieredStore: the cache actor's two tiers, host DRAM (shared memory) over disk.

    worker ──reserve, write slot, commit──► host ──evicted: demote──► disk ──evicted: deleted
    worker ◄──get_leading, read slots────── host ◄──disk hit: promote── disk

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


class TieredStore:
    """Host tier over an optional disk tier; owns both. See the module doc."""

    def __init__(self, host: HostTier, disk: DiskTier | None = None) -> None:
        assert host.owner, "a TieredStore owns its host tier (HostTier.create)"
        if disk is not None and disk.record_bytes != host.record_bytes:
            raise ValueError(
                f"disk tier records are {disk.record_bytes} bytes, host tier "
                f"records {host.record_bytes}"
            )
        self.host = host
        self.disk = disk
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
        return None

    def __contains__(self, block_hash: int) -> bool:
        return self.tier_of(block_hash) is not None

    def counters(self) -> dict[Tier, TierCounters]:
        """What each tier it has counted (without a disk tier: the host's only)."""
        return {
            tier: stats.counters()
            for tier, stats in self.stats.items()
            if tier == "host" or self.disk is not None
        }

    def held(self, tier: str, limit: int | None = None) -> list[int]:
        """The block hashes `tier` holds (committed), at most `limit` of them."""
        blocks = self.host if tier == "host" else self.disk if tier == "disk" else None
        if tier not in STORE_TIERS:
            raise ValueError(f"tier {tier!r}: expected one of {STORE_TIERS}")
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
        self._count("host", len(block_hashes), num_host)
        if self.disk is not None:
            self._count("disk", len(block_hashes) - num_host, len(hits) - num_host)
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
        hits: list[Hit] = []
        staging = True
        for block_hash, tier in found:
            slot = None
            staging = staging and len(hits) < window
            if staging and tier == "host":
                slot = self.host.lookup([block_hash])[0]
            elif staging:
                if not self._fetch(block_hash):
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

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first; runs of one kind and tier merged."""
        events, self._events = self._events, []
        return [
            kind(tier=tier) if kind is AllBlocksCleared else kind(block_hashes=hashes, tier=tier)
            for kind, tier, hashes in events
        ]

    def close(self) -> None:
        """Unlink the host tier's shared memory and stop the disk tier's helper thread
        (its block files stay)."""
        self.host.close()
        if self.disk is not None:
            self.disk.close()

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
        """block_hash left the host (still readable in slot): copy it to disk."""
        self.stats["host"].evicted += 1
        self._event(BlockRemoved, "host", block_hash)
        if self.disk is None:
            return
        if block_hash in self.disk:
            self.disk.touch(block_hash)
            return
        if not self.host.read_into(slot, block_hash, self._demoting):
            return  # not intact in its slot: dropped, not demoted
        stored, evicted = self.disk.write(block_hash, self._demoting, keep)
        for dropped in evicted:
            self.stats["disk"].evicted += 1
            self._event(BlockRemoved, "disk", dropped)
        if stored:
            self.stats["disk"].offloaded += 1
            self._event(BlockStored, "disk", block_hash)

    def _fetch(self, block_hash: int) -> bool:
        """Read a disk block into the promotion buffer; False (a miss) if it fails its
        checks. Read before a slot is allocated, so a corrupt block evicts nothing."""
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

    def _count(self, tier: str, queries: int, hits: int) -> None:
        self.stats[tier].lookups += queries
        self.stats[tier].hits += hits

    def _event(self, kind: type, tier: str, block_hash: int) -> None:
        if self._events and self._events[-1][:2] == (kind, tier):
            self._events[-1][2].append(block_hash)
        else:
            self._events.append((kind, tier, [block_hash]))
