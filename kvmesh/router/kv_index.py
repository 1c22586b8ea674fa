"""KVIndex: which worker holds which KV block, at which tier, fed by KV events.

Block hashes are chained (kvmesh.kv.block_hash), so one hash names a whole prefix and
the index needs no tree: a dict maps each block hash to the workers holding it. The
request's hash list is walked from the front up to the first block nobody holds; a
worker's run ends at the first block it holds in no tier. Cost: O(matched blocks), not
O(blocks indexed) and not O(workers x blocks).

Holders of one block are one int, four bits per worker slot (a "lane"):

    bit  4*slot + 0   device
    bit  4*slot + 1   host
    bit  4*slot + 2   disk
    bit  4*slot + 3   object (the node's cache actor lists it in its object store)

    holders = 0b 0010 0000 0001   slot 2 holds it on host, slot 0 on device, slot 1 not at all

Consecutive blocks of a request usually have equal holder ints (the same workers
stored the same prefix), so the walk only compares ints per block and does per-worker
work once per run of equal ints. A block held in several tiers of one worker counts
once, at its fastest tier. (Measured on the Mooncake trace, a plain loop with `in`
beat itertools.groupby over map(dict.get) and a per-worker dict walk; see
`kvmesh bench index`.)

BlockStored.parent_hash is not needed: the chain is already inside each hash.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

from kvmesh.protocol import TIERS, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

LANE_BITS = len(TIERS)  # device, host, disk, object
LANE_MASK = (1 << LANE_BITS) - 1
_TIER_INDEX = {tier: i for i, tier in enumerate(TIERS)}
# lane value (a 4-bit tier mask) -> index of its fastest tier (the lowest set bit)
_FASTEST = [(lane & -lane).bit_length() - 1 for lane in range(1 << LANE_BITS)]


class Overlap(NamedTuple):
    """The leading blocks of a request one worker holds, counted at their fastest tier."""

    device: int = 0
    host: int = 0
    disk: int = 0
    object: int = 0

    @property
    def num_blocks(self) -> int:
        return self.device + self.host + self.disk + self.object


class KVIndex:
    """Block hash -> the workers holding it and at which tiers; answers leading-run overlaps.

    Worker ids are any hashable (the router uses actor ids). A worker gets a slot on its
    first event; `remove_worker` frees the slot for reuse. Removing a block the worker
    does not hold is a no-op, so a late or repeated event does no harm.
    """

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}  # block hash -> holder lanes (see module doc)
        self._slots: dict[Hashable, int] = {}  # worker id -> slot
        self._worker_at_bit: dict[int, Hashable] = {}  # LANE_BITS*slot -> worker id
        self._free_slots: list[int] = []
        self._lane_lows = 0  # the lowest bit of every slot's lane
        # worker id -> per tier, the block hashes it holds there
        self._held: dict[Hashable, tuple[set[int], ...]] = {}
        self._on_event = {
            BlockStored: self._on_block_stored,
            BlockRemoved: self._on_block_removed,
            AllBlocksCleared: self._on_all_blocks_cleared,
        }

    def __len__(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._holders)

    @property
    def workers(self) -> list[Hashable]:
        return list(self._slots)

    def num_blocks(self, worker_id: Hashable, tier: str | None = None) -> int:
        """Blocks `worker_id` holds in `tier` (None: in any tier)."""
        held = self._held.get(worker_id)
        if held is None:
            return 0
        if tier is not None:
            return len(held[_tier_index(tier)])
        return len(set().union(*held))

    def apply(self, worker_id: Hashable, event: KVEvent) -> None:
        """Fold one KV event of `worker_id` into the index.

        Raises TypeError for a message that is no KV event and ValueError for an unknown
        tier, so the caller can log and drop it.
        """
        handler = self._on_event.get(type(event))
        if handler is None:
            raise TypeError(f"not a KV event: {type(event).__name__}")
        handler(worker_id, event)

    def remove_worker(self, worker_id: Hashable) -> None:
        """Forget every block of `worker_id` (it died or left); unknown ids are a no-op."""
        if worker_id not in self._slots:
            return
        for tier in TIERS:
            self._on_all_blocks_cleared(worker_id, AllBlocksCleared(tier=tier))
        slot = self._slots.pop(worker_id)
        del self._worker_at_bit[slot * LANE_BITS]
        del self._held[worker_id]
        self._free_slots.append(slot)

    def overlaps(self, block_hashes: Sequence[int]) -> dict[Hashable, Overlap]:
        """Per worker, the leading blocks of `block_hashes` it holds, counted per tier.

        A worker's run stops at the first block it holds in no tier; workers with an
        empty run are absent. Reads `block_hashes` only as far as some worker holds them.
        """
        holders = self._holders
        if not block_hashes or block_hashes[0] not in holders:
            return {}  # most requests of a trace: nobody holds the first block
        # runs of equal holder ints: (holders, number of consecutive blocks)
        runs = []
        current = holders[block_hashes[0]]
        num = 0
        for block_hash in block_hashes:
            if block_hash not in holders:
                break
            value = holders[block_hash]
            if value == current:
                num += 1
            else:
                runs.append((current, num))
                current, num = value, 1
        runs.append((current, num))

        tallies: dict[int, list[int]] = {}  # lane's lowest bit -> count per tier
        running = self._lane_lows  # the lowest bit of each lane whose run goes on
        for value, num in runs:
            # a lane's lowest bit ORed with its own slower tiers' bits: held in any tier
            running &= value | value >> 1 | value >> 2 | value >> 3
            if not running:
                break
            lanes = running
            while lanes:
                low = lanes & -lanes
                bit = low.bit_length() - 1
                tally = tallies.get(bit)
                if tally is None:
                    tally = tallies[bit] = [0, 0, 0, 0]
                tally[_FASTEST[(value >> bit) & LANE_MASK]] += num
                lanes ^= low
        worker_at_bit = self._worker_at_bit
        return {worker_at_bit[bit]: Overlap._make(t) for bit, t in tallies.items()}

    def _slot_bit(self, worker_id: Hashable, tier: str) -> int:
        """The holder bit of `worker_id` at `tier`, giving the worker a slot if new."""
        tier_index = _tier_index(tier)
        slot = self._slots.get(worker_id)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slots)
            self._lane_lows |= 1 << (slot * LANE_BITS)
            self._slots[worker_id] = slot
            self._worker_at_bit[slot * LANE_BITS] = worker_id
            self._held[worker_id] = tuple(set() for _ in TIERS)
        return 1 << (slot * LANE_BITS + tier_index)

    def _on_block_stored(self, worker_id: Hashable, event: BlockStored) -> None:
        bit = self._slot_bit(worker_id, event.tier)
        holders = self._holders
        get = holders.get
        for block_hash in event.block_hashes:
            holders[block_hash] = get(block_hash, 0) | bit
        self._held[worker_id][_TIER_INDEX[event.tier]].update(event.block_hashes)

    def _on_block_removed(self, worker_id: Hashable, event: BlockRemoved) -> None:
        tier = _tier_index(event.tier)
        if worker_id not in self._slots:
            return
        held = self._held[worker_id][tier]
        gone = held.intersection(event.block_hashes)
        held -= gone
        self._drop(self._slot_bit(worker_id, event.tier), gone)

    def _on_all_blocks_cleared(self, worker_id: Hashable, event: AllBlocksCleared) -> None:
        tier = _tier_index(event.tier)
        if worker_id not in self._slots:
            return
        held = self._held[worker_id][tier]
        self._drop(self._slot_bit(worker_id, event.tier), held)
        held.clear()

    def _drop(self, bit: int, block_hashes: Iterable[int]) -> None:
        holders = self._holders
        keep = ~bit
        for block_hash in block_hashes:
            remaining = holders[block_hash] & keep
            if remaining:
                holders[block_hash] = remaining
            else:
                del holders[block_hash]


def _tier_index(tier: str) -> int:
    index = _TIER_INDEX.get(tier)
    if index is None:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    return index
