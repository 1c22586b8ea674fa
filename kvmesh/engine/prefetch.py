"""Connector lookups prefetched on the event loop, so that admission never waits on
another process.

A worker's KV tiers may live in another process (the node's cache actor). Asking it at
admission would block the engine thread, and every running sequence with it, for a
round trip (or a timeout, when the cache actor is gone). So the worker asks when it
accepts the request, on its event loop, and hands the answer to the engine with it:

    event loop   Generate ─► hashes of the prompt's full blocks (Engine.prefix_hashes)
                             minus the leading ones the device caches (DevicePrefix)
                             ─► CacheLookup ─► Prefetch(hits, shm_name)
                             ─► add_request(..., prefetched=Prefetch)      (a command)
    engine       admission: device hits, then Prefetch.run(the hashes after them)

The device prefix the prefetch assumed may have changed by admission (one step's KV
events late, or steps later when the request waits): a prefix grown since takes the
rest of the run; one shrunk since leaves a gap before the run, and nothing is
onboarded (the blocks are computed). A prefetched hit may also have gone stale (its
host slot rewritten, its segment replaced by a restarted cache actor): the load checks
every record (generation, checksum, full-hash tag) and computes what fails, as it
always has. A prefetch answers the request's first admission only; a sequence
preempted and readmitted has none, nor has a request added without one.

Torch-free: the cache actor's client (kvmesh.actors.cache) builds Prefetch values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvmesh.cache.store import Hit
from kvmesh.kv.block_hash import wire_hash
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(frozen=True)
class Prefetch:
    """The tiers' leading run for a request's blocks, asked when it arrived: hits named
    by full hash, in the host tier of segment `shm_name` (slot None: held, not staged)."""

    hits: tuple[Hit, ...]
    shm_name: str

    def run(self, block_hashes: Sequence[int]) -> list[Hit]:
        """The prefetched hits for a leading run of block_hashes: empty unless the
        prefetch asked for block_hashes[0] (the chain hash names a block's position)."""
        names = [hit.block_hash for hit in self.hits]
        if not block_hashes or block_hashes[0] not in names:
            return []
        run = []
        first = names.index(block_hashes[0])
        for hit, block_hash in zip(self.hits[first:], block_hashes, strict=False):
            if hit.block_hash != block_hash:
                break
            run.append(hit)
        return run


def named(hits: Sequence[Hit], block_hashes: Sequence[int]) -> list[Hit]:
    """Hits the tiers returned under wire hashes, named by the full hashes they were
    asked for (a leading run: hit i answers block_hashes[i])."""
    return [hit._replace(block_hash=full) for hit, full in zip(hits, block_hashes, strict=False)]


class DevicePrefix:
    """The device pool's prefix cache as its KV events tell it (wire hashes), kept on the
    event loop: how many leading blocks of a prompt the device holds, so that a prefetch
    asks the tiers for the rest only (the tiers hold what the device evicted)."""

    def __init__(self) -> None:
        self._blocks: set[int] = set()

    def apply(self, events: Iterable[KVEvent]) -> None:
        for event in events:
            if event.tier != "device":
                continue
            if isinstance(event, BlockStored):
                self._blocks.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._blocks.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._blocks.clear()

    def num_leading(self, block_hashes: Iterable[int]) -> int:
        num = 0
        for block_hash in block_hashes:
            if wire_hash(block_hash) not in self._blocks:
                break
            num += 1
        return num
