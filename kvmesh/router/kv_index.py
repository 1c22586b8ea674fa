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

The walk. A worker's run goes on while it holds the block in some tier, so the set of
running lanes only shrinks, and only where the holder int changes. Consecutive blocks of
a request usually have equal holder ints (the same workers stored the same prefix), so
per block the walk does one dict get and one `is` (holder ints are canonical: one int
object per distinct value, so `is` is `==`, and few objects stay in cache). Where the
int changes, the lanes that drop out end their runs there:

    block        0     1     2     3     4
    holders     {a,b,c} same {a,c} same {c}   -> b: 2 blocks, a: 4, c: 5 (end of request)

Each ending set of lanes becomes worker ids once (decoded with itertools.compress over
the int's binary digits, cached per lane set: the same sets recur request after
request), and its workers share one Overlap(n). A block held off device by some
lane switches to a slower walk that also tallies host, disk and object blocks per worker; a
block held in several tiers of one worker counts once, at its fastest tier.

BlockStored.parent_hash is not needed: the chain is already inside each hash.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from itertools import compress
from typing import NamedTuple

from kvmesh.protocol import TIERS, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

LANE_BITS = len(TIERS)  # device, host, disk, object
_TIER_INDEX = {tier: i for i, tier in enumerate(TIERS)}
_FLAG_BYTES = bytes.maketrans(b"01", b"\x00\x01")
CANONICAL_MIN = 4096  # distinct holder values kept before unused ones are forgotten
FEW_LANES = 6  # lane sets up to this size are decoded bit by bit (see _workers_of)
LANE_CACHE_SIZE = 4096  # lane sets whose worker ids KVIndex keeps decoded
_DEVICE_RUNS: dict[int, Overlap] = {}  # n -> Overlap(n) (device only), shared: immutable


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
        self._worker_by_slot: list[Hashable] = []
        self._lane_lows = 0  # the lowest bit of every slot's lane
        self._off_device_bits = 0  # every lane's host, disk and object bits
        self._lane_workers: dict[int, tuple[Hashable, ...]] = {}  # see _workers_of
        # one int object per distinct holder value, so the walk compares with `is`
        self._canonical: dict[int, int] = {}
        self._canonical_limit = CANONICAL_MIN
        self._num_off_device = 0  # blocks some worker holds off device
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
        get = self._holders.get
        blocks = iter(block_hashes)
        value = get(next(blocks, None))
        if value is None:
            return {}  # most requests of a trace: nobody holds the first block
        if self._num_off_device:
            running = _any_tier(value) & self._lane_lows
            return self._overlaps_tiered(blocks, value, running)
        running = value  # device bits only: the lanes whose run goes on
        ends: list[tuple[int, int, int]] = []  # (running lanes, those ending, run length)
        position = 1
        for block_hash in blocks:
            held = get(block_hash)
            if held is value:  # holder values are canonical: `is` is `==`
                position += 1
                continue
            if held is None:
                break
            still = running & held
            if still != running:
                ends.append((running, running ^ still, position))
                if not still:
                    return self._settle_device_runs(ends)
                running = held if still == held else still
            value = held
            position += 1
        ends.append((running, running, position))
        return self._settle_device_runs(ends)

    def _settle_device_runs(self, ends: list[tuple[int, int, int]]) -> dict[Hashable, Overlap]:
        """The answer for runs held on device only, from the walk's (running lanes,
        lanes whose runs end there, blocks in their runs), in walk order.

        Giving the run length to the whole running set is as right as giving it to the
        ending lanes alone, since deeper entries overwrite it for the lanes that go on;
        the running set is often a block's whole holder set, seen (and decoded) before,
        where the ending set is a difference that may be new.
        """
        lane_workers = self._lane_workers
        answer: dict[Hashable, Overlap] | None = None
        for running, ending, num_blocks in ends:
            workers = lane_workers.get(ending)
            if workers is None:
                workers = lane_workers.get(running)
                if workers is None:
                    recurs = self._canonical.get(running) is running
                    workers = self._workers_of(running if recurs else ending)
            overlap = _DEVICE_RUNS.get(num_blocks) or _device_run(num_blocks)
            if answer is None:
                answer = dict.fromkeys(workers, overlap)
            else:
                answer.update(dict.fromkeys(workers, overlap))
        assert answer is not None, "a walk ends at least once"
        return answer

    def _overlaps_tiered(
        self, blocks: Iterator[int], value: int, running: int
    ) -> dict[Hashable, Overlap]:
        """overlaps() while some block is held off device: the same walk from block 1
        on (block 0 has holders `value`), tallying blocks off device per worker."""
        get = self._holders.get
        answer: dict[Hashable, Overlap] = {}
        segment_start, position = 0, 1
        off_device: dict[int, list[int]] = {}  # lane's lowest bit -> [host, disk, object]
        for block_hash in blocks:
            held = get(block_hash)
            if held != value:
                if value & self._off_device_bits:
                    _tally_off_device(off_device, value, running, position - segment_start)
                if held is None:
                    break
                still = running & _any_tier(held)
                if still != running:
                    self._settle(answer, running ^ still, position, off_device)
                    if not still:
                        return answer
                    running = still
                value, segment_start = held, position
            position += 1
        else:
            if value & self._off_device_bits:
                _tally_off_device(off_device, value, running, position - segment_start)
        self._settle(answer, running, position, off_device)
        return answer

    def _settle(
        self, answer: dict, lanes: int, num_blocks: int, off_device: dict[int, list[int]]
    ) -> None:
        """Put the workers of `lanes` (lowest lane bits), whose runs end after
        `num_blocks` blocks, into `answer`."""
        overlap = _DEVICE_RUNS.get(num_blocks) or _DEVICE_RUNS.setdefault(
            num_blocks, Overlap(num_blocks)
        )
        answer.update(dict.fromkeys(self._workers_of(lanes), overlap))
        for bit, (host, disk, in_object) in off_device.items():
            if lanes >> bit & 1:
                answer[self._worker_at_bit[bit]] = Overlap(
                    num_blocks - host - disk - in_object, host, disk, in_object
                )

    def _workers_of(self, lanes: int) -> tuple[Hashable, ...]:
        """The worker ids of a lane-bit set; cached, as the same sets recur request after
        request (and decoding a 3,000-bit int costs more than hashing it). A few lanes
        are peeled off one by one; more, by one pass over the int's binary digits."""
        workers = self._lane_workers.get(lanes)
        if workers is None:
            if len(self._lane_workers) >= LANE_CACHE_SIZE:
                self._lane_workers.clear()
            if lanes.bit_count() <= FEW_LANES:
                worker_at_bit, found, rest = self._worker_at_bit, [], lanes
                while rest:
                    low = rest & -rest
                    found.append(worker_at_bit[low.bit_length() - 1])
                    rest ^= low
                workers = tuple(found)
            else:
                flags = bin(lanes)[:1:-1][::LANE_BITS].encode().translate(_FLAG_BYTES)
                workers = tuple(compress(self._worker_by_slot, flags))
            self._lane_workers[lanes] = workers
        return workers

    def _slot_bit(self, worker_id: Hashable, tier: str) -> int:
        """The holder bit of `worker_id` at `tier`, giving the worker a slot if new."""
        tier_index = _tier_index(tier)
        slot = self._slots.get(worker_id)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._lane_workers.clear()  # cached sets may name the slot's last worker
            else:
                slot = len(self._slots)
            self._lane_lows |= 1 << (slot * LANE_BITS)
            lows = self._lane_lows
            self._off_device_bits = lows << 1 | lows << 2 | lows << 3
            self._slots[worker_id] = slot
            self._worker_at_bit[slot * LANE_BITS] = worker_id
            if slot == len(self._worker_by_slot):
                self._worker_by_slot.append(worker_id)
            self._worker_by_slot[slot] = worker_id
            self._held[worker_id] = tuple(set() for _ in TIERS)
        return 1 << (slot * LANE_BITS + tier_index)

    def _on_block_stored(self, worker_id: Hashable, event: BlockStored) -> None:
        bit = self._slot_bit(worker_id, event.tier)
        holders = self._holders
        get = holders.get
        canonical = self._canonical
        off_device_bits = self._off_device_bits
        counting = bit & off_device_bits  # stored off device
        before = after = None  # consecutive blocks mostly share one holder value
        newly_off_device = added = 0
        for block_hash in event.block_hashes:
            value = get(block_hash, 0)
            if value is not before:
                before = value
                after = value | bit
                after = canonical.setdefault(after, after)
                newly_off_device = 1 if counting and not value & off_device_bits else 0
            holders[block_hash] = after
            added += newly_off_device
        self._num_off_device += added
        self._held[worker_id][_TIER_INDEX[event.tier]].update(event.block_hashes)
        if len(canonical) > self._canonical_limit:
            self._recanonicalize()

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
        canonical = self._canonical
        off_device_bits = self._off_device_bits
        counting = bit & off_device_bits  # dropped from a tier off device
        keep = ~bit
        before = after = None
        no_longer_off_device = removed = 0
        for block_hash in block_hashes:
            value = holders[block_hash]
            if value is not before:
                before = value
                after = value & keep
                after = canonical.setdefault(after, after)
                no_longer_off_device = (
                    1 if counting and value & off_device_bits and not after & off_device_bits else 0
                )
            if after:
                holders[block_hash] = after
            else:
                del holders[block_hash]
            removed += no_longer_off_device
        self._num_off_device -= removed
        if len(canonical) > self._canonical_limit:
            self._recanonicalize()

    def _recanonicalize(self) -> None:
        """Forget holder values no block has any more (the canonical dict only grows)."""
        canonical: dict[int, int] = {}
        holders = self._holders
        for block_hash, value in holders.items():
            holders[block_hash] = canonical.setdefault(value, value)
        self._canonical = canonical
        self._canonical_limit = max(CANONICAL_MIN, 2 * len(canonical))


def _tally_off_device(
    off_device: dict[int, list[int]], value: int, running: int, num_blocks: int
) -> None:
    """Add `num_blocks` blocks of holder lanes `value` to the host, disk or object tally
    of each running lane (lowest lane bits) whose fastest tier there is off device."""
    device = value
    host = value >> 1 & ~device
    disk = value >> 2 & ~device & ~host
    in_object = value >> 3 & ~device & ~host & ~disk
    for tier, lanes in ((0, host & running), (1, disk & running), (2, in_object & running)):
        for bit in _set_bits(lanes):
            tally = off_device.get(bit)
            if tally is None:
                tally = off_device[bit] = [0, 0, 0]
            tally[tier] += num_blocks


def _any_tier(value: int) -> int:
    """Each lane's lowest bit set where the lane holds the block in any tier."""
    return value | value >> 1 | value >> 2 | value >> 3


def _set_bits(mask: int) -> list[int]:
    """Positions of the set bits of `mask`, lowest first; linear in its length, however
    many bits (`mask & -mask` per bit would be quadratic on 3,000-bit ints)."""
    digits = bin(mask)
    top = len(digits) - 1
    bits = []
    i = digits.rfind("1")
    while i > 1:
        bits.append(top - i)
        i = digits.rfind("1", 2, i)
    return bits


def _device_run(n):
    overlap = _DEVICE_RUNS.get(n)
    if overlap is None:
        overlap = _DEVICE_RUNS[n] = Overlap(n)
    return overlap


def _tier_index(tier: str) -> int:
    index = _TIER_INDEX.get(tier)
    if index is None:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    return index
