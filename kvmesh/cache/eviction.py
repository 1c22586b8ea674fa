"""Eviction policies of the cache tiers: which held block a full tier gives up first.

Every policy tracks keys (block hashes) through four calls: `insert` when a block enters
the tier, `touch` on every hit, `remove` when it leaves, and `victim(skip)`, the first
key in eviction order that is not in `skip` (the tier passes the blocks it must keep for
the call in progress). Iterating a policy yields its keys in eviction order. A policy
never removes a key by itself: the tier does, after it chose to evict the victim.
Picked once per tier by name: `make_policy(kv.eviction)`.

    lru   least recently used: keys in order of last insert/touch; the oldest goes.
          insert, touch, remove, victim: O(1).
    lfu   least frequently used: a key's count starts at 1 on insert and grows by 1
          per touch; the lowest count goes, ties broken by least recent use (each count
          keeps its keys in order of arrival at that count, which is their last use).
          insert, touch, victim: O(1); remove: O(1), or O(distinct counts) when it
          empties the lowest count. Counts never decay: a once-hot block outlives newer
          blocks until they are touched as often.
    fifo  first in, first out: keys in order of insert; hits change nothing.
          insert, touch, remove, victim: O(1).

victim(skip) walks past skipped keys, so it costs O(1 + skipped keys) (lfu: plus sorting
its distinct counts when the first candidate is skipped).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterator
from typing import Protocol

EVICTION_POLICIES = ("lru", "lfu", "fifo")


class EvictionPolicy(Protocol):
    """The interface every tier's policy offers; keys are any hashable (block hashes)."""

    def insert(self, key: Hashable) -> None: ...
    def touch(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victim(self, skip: Container[Hashable] = ()) -> Hashable | None: ...
    def __iter__(self) -> Iterator[Hashable]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: Hashable) -> bool: ...


class LRU:
    """Least recently used first (see the module doc)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest use first

    def insert(self, key: Hashable) -> None:
        assert key not in self._order, f"key {key!r} inserted twice"
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def victim(self, skip: Container[Hashable] = ()) -> Hashable | None:
        return _first(iter(self._order), skip)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order


class FIFO(LRU):
    """First inserted first; hits do not reorder (see the module doc)."""

    def touch(self, key: Hashable) -> None:
        assert key in self._order, f"touch of unknown key {key!r}"


class LFU:
    """Least frequently used first, least recently used among equals (see the module doc)."""

    def __init__(self) -> None:
        self._counts: dict[Hashable, int] = {}
        # count -> keys at that count, in order of arrival there (= last use)
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._min_count = 0  # the lowest count held; 0 when empty

    def insert(self, key: Hashable) -> None:
        assert key not in self._counts, f"key {key!r} inserted twice"
        self._counts[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min_count = 1

    def touch(self, key: Hashable) -> None:
        count = self._counts[key]
        self._leave(key, count)
        self._counts[key] = count + 1
        self._buckets.setdefault(count + 1, OrderedDict())[key] = None
        if self._min_count == 0:  # the key left the lowest count for the next one
            self._min_count = count + 1

    def remove(self, key: Hashable) -> None:
        self._leave(key, self._counts.pop(key))
        if self._min_count == 0 and self._buckets:
            self._min_count = min(self._buckets)

    def victim(self, skip: Container[Hashable] = ()) -> Hashable | None:
        if not self._counts:
            return None
        first = next(iter(self._buckets[self._min_count]))
        return first if first not in skip else _first(iter(self), skip)

    def __iter__(self) -> Iterator[Hashable]:
        for count in sorted(self._buckets):
            yield from self._buckets[count]

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._counts

    def _leave(self, key: Hashable, count: int) -> None:
        """Take key out of its count's bucket; min_count drops to 0 if that emptied it."""
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
            if count == self._min_count:
                self._min_count = 0


_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "fifo": FIFO}


def make_policy(name: str) -> EvictionPolicy:
    """A new, empty policy by its kv.eviction name."""
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"eviction policy must be one of {', '.join(EVICTION_POLICIES)}, got {name!r}"
        ) from None


def _first(keys: Iterator[Hashable], skip: Container[Hashable]) -> Hashable | None:
    for key in keys:
        if key not in skip:
            return key
    return None
