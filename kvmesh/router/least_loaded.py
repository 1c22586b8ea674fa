"""LeastLoaded: the least loaded of a fixed set of workers, kept up to date as loads change.

The router's kv policy (kvmesh.router.policy, `_pick_kv_unscored`) needs, per request,
the worker of lowest (load, worker id) among its candidates. With a thousand candidates
a pass over them all costs more than the rest of the decision, and between two requests
only the few workers that were placed on, finished or reported change load.

Algorithm: a binary heap of (load, worker id) entries with lazy deletion. The loads
themselves live in one dict the Router owns (worker id -> load; absent means 0.0), the
heap only orders them:

- `changed(w)`: w's load in the dict changed; push (its new load, w). Its older entries
  stay in the heap, stale.
- `least()`: pop entries from the top while they are stale (their load is not w's load
  in the dict now); the first entry that is not is the answer. Every member has one
  entry with its current load (pushed at its last change, or when the heap was built),
  so the top valid entry is the lowest (load, id) of all members.
- When stale entries outnumber the members (more than REBUILD_FACTOR x members plus
  REBUILD_SLACK entries in all), the heap is built anew from the dict: O(members), once
  per that many changes.

Costs: changed O(log n), least O(log n) amortized, against O(n) for the scan.
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heapify, heappop, heappush

REBUILD_FACTOR = 2
REBUILD_SLACK = 64


class LeastLoaded:
    """Lowest (load, worker id) among `members`, loads read from `loads` (absent: 0.0).

    The caller owns `loads` and calls `changed(worker_id)` after each change of a value
    in it (an id that is no member is ignored). `least()` needs at least one member.
    """

    def __init__(self, members: Iterable[str], loads: dict[str, float]) -> None:
        self.members = frozenset(members)
        if not self.members:
            raise ValueError("LeastLoaded needs at least one member")
        self._loads = loads
        self._heap: list[tuple[float, str]] = []
        self._rebuild()

    def changed(self, worker_id: str) -> None:
        """`worker_id`'s load in the dict changed (or it left the dict: load 0.0)."""
        if worker_id not in self.members:
            return
        heap = self._heap
        heappush(heap, (self._loads.get(worker_id, 0.0), worker_id))
        if len(heap) > REBUILD_FACTOR * len(self.members) + REBUILD_SLACK:
            self._rebuild()

    def least(self) -> str:
        """The member of lowest load, the lowest id among equals."""
        heap, load_of = self._heap, self._loads.get
        while True:
            load, worker_id = heap[0]
            if load_of(worker_id, 0.0) == load:
                return worker_id
            heappop(heap)

    def _rebuild(self) -> None:
        load_of = self._loads.get
        self._heap = [(load_of(w, 0.0), w) for w in self.members]
        heapify(self._heap)
