"""Routing policies: which worker decodes a request and which, if any, prefills it.

Algorithm (policy "kv", the default). For a request of n prompt tokens whose full
blocks hash to h_0..h_k-1 (block_size tokens each):

1. One KVIndex lookup gives, per worker, the leading blocks it holds on device, host,
   disk and in its node's object tier (nd, nh, nk, no).
2. Every alive worker w of the role gets a cost in tokens, lower is better:

       credit(w)   = block_size * (device_weight*nd + host_weight*nh + disk_weight*nk
                                   + object_weight*no)
       uncached(w) = max(0, n - credit(w))                 prefill work left on w
       load(w)     = queued_tokens + kv_usage * capacity_tokens      (w's last report)
                     + pending_tokens                       (router's own predictions)
       cost(w)     = uncached(w) - adapter(w) + load_weight * load(w)
       adapter(w)  = adapter_weight when the request names a LoRA adapter that w has
                     loaded (choose's credits, from w's load reports), else 0

   temperature 0 takes the lowest cost, ties broken by lower load, then lower worker
   id; temperature T > 0 samples w with probability ~ exp(-cost(w) / T) from a
   seeded RNG (T is in tokens: a worker T tokens dearer is e times less likely).
3. Decode worker D: the pick among alive "decode" workers (where the KV ends up).
   No alive decode worker raises NoWorkerError("decode").
4. Conditional disaggregation: suffix = n - block_size * (leading blocks D holds, any
   tier). Prefill runs locally on D (prefill=None) when
       suffix < disagg_min_tokens                         local_reason "short_suffix"
       no alive "prefill" worker                          local_reason "no_prefill_worker"
       every alive prefill worker is busy:                local_reason "prefill_busy"
           queued_tokens + pending_tokens > prefill_busy_tokens
   else the prefill worker P is the pick among the non-busy prefill workers, by the
   same cost (P's own overlap credit plus its load).
5. Predictions: `on_placed` adds n tokens to D's pending_tokens and P's tokens to
   compute to P's; they count until the worker's next load report (`on_load_report`,
   which then carries that load itself) or the request's end (`on_finished`),
   whichever comes first. So a burst of equal requests spreads over the workers
   instead of piling onto one before any report or KV event arrives.

Baselines, for comparison: "round_robin" (each role cycles through its eligible
workers in the order given), "random" (seeded uniform choice), "least_loaded" (lowest
load(w), then id). They ignore the overlaps when picking, but step 4 still measures
D's cached prefix, so every policy's disaggregation decisions and Placement numbers
are comparable.

Settings (RouterSettings): policy, device_weight, host_weight, disk_weight, object_weight,
load_weight, adapter_weight, temperature, seed, disagg_min_tokens, prefill_busy_tokens.
Their defaults are stated once, as cluster.toml's [router] table
(kvmesh.config.schema.RouterConfig), which is what a cluster runs with.
"""

from __future__ import annotations

import itertools
import math
import operator
import random
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from kvmesh.config.schema import RouterConfig
from kvmesh.router.kv_index import KVIndex, Overlap
from kvmesh.router.least_loaded import LeastLoaded

ROLES = ("prefill", "decode")
POLICIES = ("kv", "round_robin", "random", "least_loaded")
DEFAULTS = RouterConfig()  # every setting's default, as the [router] table states it
_WORKER_ID = operator.attrgetter("worker_id")
_ALIVE_ROLE = operator.attrgetter("alive", "role")
_ALIVE_DECODE, _ALIVE_PREFILL = (True, "decode"), (True, "prefill")
MAX_SPLITS = 8  # lists of workers whose split by role choose(scores=False) keeps


class NoWorkerError(Exception):
    """No alive worker of `role` can take the request; the router replies with an error."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no alive {role} worker")
        self.role = role


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The routing policy and its settings; see the module docstring for their meaning."""

    policy: str = DEFAULTS.policy
    device_weight: float = DEFAULTS.device_weight
    host_weight: float = DEFAULTS.host_weight
    disk_weight: float = DEFAULTS.disk_weight
    object_weight: float = DEFAULTS.object_weight
    load_weight: float = DEFAULTS.load_weight
    adapter_weight: float = DEFAULTS.adapter_weight
    temperature: float = DEFAULTS.temperature
    seed: int = DEFAULTS.seed
    disagg_min_tokens: int = DEFAULTS.disagg_min_tokens
    prefill_busy_tokens: int = DEFAULTS.prefill_busy_tokens

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in (
            "device_weight",
            "host_weight",
            "disk_weight",
            "object_weight",
            "load_weight",
            "adapter_weight",
            "temperature",
            "disagg_min_tokens",
            "prefill_busy_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(slots=True)
class WorkerState:
    """What the router knows of one worker: registry facts and its last load report.

    num_running is kept for status only: the running requests' KV is in kv_usage, which
    counts as kv_usage * capacity_tokens tokens of load (nothing while capacity is 0).
    """

    worker_id: str
    role: str
    capacity_tokens: int = 0  # KV cache size in tokens
    alive: bool = True
    num_running: int = 0  # requests decoding or prefilling
    num_queued_tokens: int = 0  # prompt tokens waiting to be prefilled
    kv_usage: float = 0.0  # fraction of KV blocks referenced by running requests

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """Where a request goes: prefill worker (None: the decode worker prefills) and decode.

    expected_cached_tokens: leading prompt tokens the decode worker holds (any tier).
    best_cached_tokens: the most any candidate decode worker held (any tier): what the
    placement could have reused; the gap to expected_cached_tokens is routing quality.
    prefill_tokens: prompt tokens the prefilling worker has to compute.
    local_reason: why prefill is local ("short_suffix", "no_prefill_worker",
    "prefill_busy"), None when remote. *_scores: what the policy compared per worker,
    lower is better (cost for kv, load for least_loaded, empty for the others).
    """

    prefill: str | None
    decode: str
    num_prompt_tokens: int
    expected_cached_tokens: int
    best_cached_tokens: int
    prefill_tokens: int
    local_reason: str | None
    decode_scores: dict[str, float]
    prefill_scores: dict[str, float]


class Router:
    """Places requests on workers with one policy, picked once here; keeps the router's
    in-flight load predictions between load reports."""

    def __init__(self, settings: RouterSettings | None = None) -> None:
        self.settings = settings = settings or RouterSettings()
        self._pick = {
            "kv": self._pick_kv,
            "round_robin": self._pick_round_robin,
            "random": self._pick_random,
            "least_loaded": self._pick_least_loaded,
        }[settings.policy]
        self._weights = (
            settings.device_weight,
            settings.host_weight,
            settings.disk_weight,
            settings.object_weight,
        )
        self._rng = random.Random(settings.seed)
        self._cursors = dict.fromkeys(ROLES, 0)
        self.pending_tokens: dict[str, int] = {}
        # worker id -> load(worker) as on_load_report and the predictions left it, a
        # float (for choose(scores=False), which reads no WorkerState field for it)
        self._loads: dict[str, float] = {}
        # id(workers list) -> its split by role, for the lists choose(scores=False) was
        # given (see _split_of): a few, so the lists of several models all stay
        self._splits: dict[int, _Split] = {}
        self._current: _Split | None = None  # the split of the choose() running now
        self._credits: Mapping[str, float] = {}  # the choose() running now's credits
        self._report_epochs: dict[str, int] = {}
        # request id -> [(worker id, predicted tokens, worker's report epoch when placed)]
        self._in_flight: dict[Hashable, list[tuple[str, int, int]]] = {}

    def choose(
        self,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        block_size: int,
        workers: Collection[WorkerState],
        index: KVIndex | None,
        scores: bool = True,
        credits: Mapping[str, float] | None = None,
    ) -> Placement:
        """The placement of one request; raises NoWorkerError when no decode worker is alive.

        scores=False: the same placement without the per-worker score tables (empty):
        kv at temperature 0 then costs only the workers holding a prefix and the least
        loaded one (kept in a LeastLoaded heap), not all; and the split of `workers` by
        role is kept while the same list object comes again, so the caller must pass a
        new list when a worker's role or alive changes (the router actor does: a new
        list for each change of its registry). credits: per worker, prompt tokens a kv
        cost takes off beyond its cached blocks (the request's LoRA adapter loaded there)."""
        # the candidates of each role, filtered in C: (alive, role) per worker, once; with
        # scores=False, once per list of workers (see _split_of)
        split = self._split_of(workers, cached=not scores)
        decoders = split.decoders
        if not decoders:
            raise NoWorkerError("decode")
        overlaps = index.overlaps(block_hashes) if index is not None else {}
        self._credits = credits or {}
        pick = self._pick
        if not scores and pick == self._pick_kv and self.settings.temperature == 0:
            pick = self._pick_kv_unscored
            self._current = split
        decode, decode_scores = pick(decoders, overlaps, num_prompt_tokens, block_size)
        cached = min(num_prompt_tokens, block_size * _num_blocks(overlaps, decode))
        best_cached = min(num_prompt_tokens, block_size * _most_blocks(overlaps, split.by_id))
        prefill, prefill_scores, local_reason = None, {}, None
        prefill_tokens = num_prompt_tokens - cached
        if prefill_tokens < self.settings.disagg_min_tokens:
            local_reason = "short_suffix"
        else:
            prefillers = split.prefillers
            idle = [w for w in prefillers if not self.is_busy(w)]
            if not prefillers:
                local_reason = "no_prefill_worker"
            elif not idle:
                local_reason = "prefill_busy"
            else:
                prefill, prefill_scores = pick(idle, overlaps, num_prompt_tokens, block_size)
                prefill_tokens = num_prompt_tokens - min(
                    num_prompt_tokens, block_size * _num_blocks(overlaps, prefill)
                )
        return Placement(
            prefill=prefill.worker_id if prefill is not None else None,
            decode=decode.worker_id,
            num_prompt_tokens=num_prompt_tokens,
            expected_cached_tokens=cached,
            best_cached_tokens=best_cached,
            prefill_tokens=prefill_tokens,
            local_reason=local_reason,
            decode_scores=decode_scores,
            prefill_scores=prefill_scores,
        )

    def _split_of(self, workers: Collection[WorkerState], cached: bool) -> _Split:
        """`workers` split by role (alive only); with `cached`, kept for this list object
        (MAX_SPLITS lists at most, then forgotten all at once)."""
        if cached:
            split = self._splits.get(id(workers))
            if split is not None and split.workers is workers:
                split.reused = True
                return split
        split = _Split(workers)
        if cached:
            if len(self._splits) >= MAX_SPLITS:
                self._splits.clear()
            self._splits[id(workers)] = split
        return split

    @property
    def num_pending_tokens(self) -> int:
        """Tokens predicted on workers that have not reported since (0 once all have)."""
        return sum(self.pending_tokens.values())

    @property
    def num_in_flight(self) -> int:
        """Placements whose request has not ended (RequestDone) nor expired."""
        return len(self._in_flight)

    def load(self, worker: WorkerState) -> float:
        """Tokens of work on `worker`: its last report plus the router's predictions since."""
        return (
            worker.num_queued_tokens
            + worker.kv_usage * worker.capacity_tokens
            + self.pending_tokens.get(worker.worker_id, 0)
        )

    def is_busy(self, worker: WorkerState) -> bool:
        """A prefill worker whose queue (reported plus predicted) is over prefill_busy_tokens."""
        queued = worker.num_queued_tokens + self.pending_tokens.get(worker.worker_id, 0)
        return queued > self.settings.prefill_busy_tokens

    def on_placed(self, request_id: Hashable, placement: Placement) -> None:
        """The request was sent as placed: count it on its workers until they report."""
        predictions = [(placement.decode, placement.num_prompt_tokens)]
        if placement.prefill is not None:
            predictions.append((placement.prefill, placement.prefill_tokens))
        record = []
        for worker_id, tokens in predictions:
            self.pending_tokens[worker_id] = self.pending_tokens.get(worker_id, 0) + tokens
            self._loads[worker_id] = self._loads.get(worker_id, 0.0) + tokens
            self._load_changed(worker_id)
            record.append((worker_id, tokens, self._report_epochs.get(worker_id, 0)))
        self._in_flight[request_id] = record

    def on_finished(self, request_id: Hashable) -> None:
        """The request ended (done, failed or aborted): drop what is left of its prediction."""
        for worker_id, tokens, epoch in self._in_flight.pop(request_id, ()):
            if self._report_epochs.get(worker_id, 0) == epoch:
                self.pending_tokens[worker_id] -= tokens
                self._loads[worker_id] = self._loads.get(worker_id, 0.0) - tokens
                self._load_changed(worker_id)

    def on_load_report(
        self, worker: WorkerState, *, num_running: int, num_queued_tokens: int, kv_usage: float
    ) -> None:
        """A worker's load report: it now carries the load the router had predicted."""
        worker.num_running = num_running
        worker.num_queued_tokens = num_queued_tokens
        worker.kv_usage = kv_usage
        self._forget_predictions(worker.worker_id)
        self._loads[worker.worker_id] = float(num_queued_tokens + kv_usage * worker.capacity_tokens)
        self._load_changed(worker.worker_id)

    def on_worker_removed(self, worker_id: str) -> None:
        """The worker left or died: its predictions no longer mean anything."""
        self._forget_predictions(worker_id)
        self.pending_tokens.pop(worker_id, None)
        self._loads.pop(worker_id, None)
        self._load_changed(worker_id)

    def _load_changed(self, worker_id: str) -> None:
        """_loads[worker_id] changed: the heaps that order the cached lists learn it."""
        for split in self._splits.values():
            split.load_changed(worker_id)

    def _forget_predictions(self, worker_id: str) -> None:
        self._report_epochs[worker_id] = self._report_epochs.get(worker_id, 0) + 1
        self.pending_tokens[worker_id] = 0

    # --- the policies: (candidates, overlaps, n, block_size) -> (pick, scores) ---

    def _pick_kv(
        self,
        candidates: list[WorkerState],
        overlaps: dict[Hashable, Overlap],
        num_prompt_tokens: int,
        block_size: int,
    ) -> tuple[WorkerState, dict[str, float]]:
        # The hot path of every placement, once per candidate (a thousand workers: a
        # thousand turns): Router.load inlined, no tuple built per worker.
        device_weight, host_weight, disk_weight, object_weight = self._weights
        load_weight = self.settings.load_weight
        pending = self.pending_tokens
        overlap_of = overlaps.get
        credit_of = self._credits.get  # the request's adapter loaded there (usually none)
        scores: dict[str, float] = {}
        best, best_cost, best_load, best_id = None, math.inf, math.inf, ""
        for worker in candidates:
            worker_id = worker.worker_id
            load = (
                worker.num_queued_tokens
                + worker.kv_usage * worker.capacity_tokens
                + pending.get(worker_id, 0)
            )
            overlap = overlap_of(worker_id)
            if overlap is None:
                cost = num_prompt_tokens + load_weight * load
            else:
                credit = block_size * (
                    device_weight * overlap.device
                    + host_weight * overlap.host
                    + disk_weight * overlap.disk
                    + object_weight * overlap.object
                )
                cost = max(0.0, num_prompt_tokens - credit) + load_weight * load
            if credit_of(worker_id) is not None:
                cost -= credit_of(worker_id)
            scores[worker_id] = cost
            # lowest (cost, load, worker id)
            if cost < best_cost or (
                cost == best_cost
                and (load < best_load or (load == best_load and worker_id < best_id))
            ):
                best, best_cost, best_load, best_id = worker, cost, load, worker_id
        temperature = self.settings.temperature
        if temperature == 0 or len(candidates) == 1:
            return best, scores
        weights = [math.exp((best_cost - scores[w.worker_id]) / temperature) for w in candidates]
        return self._rng.choices(candidates, weights)[0], scores

    def _pick_kv_unscored(
        self,
        candidates: list[WorkerState],
        overlaps: dict[Hashable, Overlap],
        num_prompt_tokens: int,
        block_size: int,
    ) -> tuple[WorkerState, dict[str, float]]:
        """_pick_kv's pick at temperature 0, costing few workers: a worker holding no
        prefix costs num_prompt_tokens + load_weight * load, so of those the least loaded
        (then lowest id) wins; and the least loaded of all, if it holds a prefix, costs
        no more than that. So the pick is among the prefix holders, the workers with a
        credit (the request's adapter loaded) and the least loaded. Loads come from the
        reports and predictions this Router was told of (_loads). The decode candidates
        of a list given again come with their LeastLoaded heap; any other list (idle
        prefill workers) is passed over in C (map, min, compress)."""
        split = self._current
        if split is not None and candidates is split.decoders:
            by_id, least = split.by_id, split.least_loaded(self._loads)
        else:
            ids = list(map(_WORKER_ID, candidates))
            by_id = dict(zip(ids, candidates, strict=True))
            least = _least_loaded(ids, self._loads)
        if not overlaps and not self._credits:
            return by_id[least], {}
        holders = [by_id[w] for w in {**overlaps, **self._credits} if w in by_id and w != least]
        return self._pick_kv([by_id[least], *holders], overlaps, num_prompt_tokens, block_size)[
            0
        ], {}

    def _pick_round_robin(self, candidates, overlaps, num_prompt_tokens, block_size):
        role = candidates[0].role
        cursor = self._cursors[role]
        self._cursors[role] = cursor + 1
        return candidates[cursor % len(candidates)], {}

    def _pick_random(self, candidates, overlaps, num_prompt_tokens, block_size):
        return self._rng.choice(candidates), {}

    def _pick_least_loaded(self, candidates, overlaps, num_prompt_tokens, block_size):
        scores = {w.worker_id: self.load(w) for w in candidates}
        return min(candidates, key=lambda w: (scores[w.worker_id], w.worker_id)), scores


class _Split:
    """A list of workers split by role, alive only, with the decode workers by id; the
    LeastLoaded heap of the decode workers is built once the list comes a second time
    (a list given once, such as one less some excluded workers, is scanned instead)."""

    def __init__(self, workers: Collection[WorkerState]) -> None:
        self.workers = workers
        states = list(map(_ALIVE_ROLE, workers))
        self.decoders = list(itertools.compress(workers, map(_ALIVE_DECODE.__eq__, states)))
        self.prefillers = list(itertools.compress(workers, map(_ALIVE_PREFILL.__eq__, states)))
        self.ids = list(map(_WORKER_ID, self.decoders))
        self.by_id = dict(zip(self.ids, self.decoders, strict=True))
        self.reused = False
        self.least: LeastLoaded | None = None

    def least_loaded(self, loads: dict[str, float]) -> str:
        """The decode worker of lowest (load, id), loads as in `loads` (absent: 0.0)."""
        if self.least is not None:
            return self.least.least()
        if self.reused:
            self.least = LeastLoaded(self.ids, loads)
            return self.least.least()
        return _least_loaded(self.ids, loads)

    def load_changed(self, worker_id: str) -> None:
        if self.least is not None:
            self.least.changed(worker_id)


def _least_loaded(ids: list[str], loads: dict[str, float]) -> str:
    """The id of lowest (load, id) among `ids`: a pass over them all, in C."""
    values = list(map(loads.get, ids, itertools.repeat(0.0)))
    lowest = min(values)
    return min(itertools.compress(ids, map(lowest.__eq__, values)))


def _num_blocks(overlaps: dict[Hashable, Overlap], worker: WorkerState) -> int:
    overlap = overlaps.get(worker.worker_id)
    return overlap.num_blocks if overlap is not None else 0


def _most_blocks(overlaps: dict[Hashable, Overlap], ids) -> int:
    """The most leading blocks any candidate (`ids`: a set or dict of their ids) holds:
    a walk of the (few) overlaps, not of the (many) candidates."""
    if not overlaps:
        return 0
    return max((o.num_blocks for worker_id, o in overlaps.items() if worker_id in ids), default=0)
