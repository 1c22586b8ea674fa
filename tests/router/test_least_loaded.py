"""LeastLoaded against the straightforward min over its members, on random load changes,
and the router's cached path (the same list of workers again and again) against the
scored kv policy while loads change."""

import random

import pytest

from kvmesh.protocol import BlockStored
from kvmesh.router.kv_index import KVIndex
from kvmesh.router.least_loaded import REBUILD_FACTOR, REBUILD_SLACK, LeastLoaded
from kvmesh.router.policy import Router, RouterSettings, WorkerState

BLOCK = 16


def make_loads(rng: random.Random, ids: list[str]) -> dict[str, float]:
    """Some ids absent (load 0.0), the others on a coarse grid so that ties happen."""
    return {w: float(rng.choice([0, 0, 16, 32, 48])) for w in ids if rng.random() < 0.7}


def lowest(members, loads: dict[str, float]) -> str:
    return min(members, key=lambda w: (loads.get(w, 0.0), w))


@pytest.mark.parametrize("seed", range(10))
def test_least_equals_the_min_over_members_as_loads_change(seed):
    rng = random.Random(seed)
    ids = [f"w{i}" for i in range(rng.choice([1, 5, 60]))]
    loads = make_loads(rng, ids + ["other"])
    members = rng.sample(ids, rng.randint(1, len(ids)))
    least = LeastLoaded(members, loads)
    for _ in range(500):
        worker_id = rng.choice(ids + ["other"])
        change = rng.random()
        if change < 0.2:
            loads.pop(worker_id, None)
        elif change < 0.6:
            loads[worker_id] = loads.get(worker_id, 0.0) + rng.choice([16, 100, -16])
        else:
            loads[worker_id] = float(rng.choice([0, 16, 32]))
        least.changed(worker_id)
        assert least.least() == lowest(members, loads)


def test_ties_go_to_the_lowest_id_and_absent_counts_as_zero():
    loads = {"a": 5.0, "c": 0.0}
    least = LeastLoaded(["c", "b", "a"], loads)
    assert least.least() == "b"  # b absent: 0.0, like c; b < c
    loads["b"] = 1.0
    least.changed("b")
    assert least.least() == "c"
    loads["a"] = -1.0
    least.changed("a")
    assert least.least() == "a"


def test_the_heap_is_rebuilt_before_stale_entries_pile_up():
    loads: dict[str, float] = {}
    least = LeastLoaded(["a", "b"], loads)
    for step in range(1000):
        loads["a"] = float(step)
        least.changed("a")
        assert len(least._heap) <= REBUILD_FACTOR * 2 + REBUILD_SLACK + 1
    assert least.least() == "b"


def test_no_members_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one member"):
        LeastLoaded([], {})


def make_cluster(rng: random.Random, num_workers: int):
    workers = [
        WorkerState(f"w{i:02d}", "prefill" if i % 5 == 4 else "decode", capacity_tokens=4096)
        for i in range(num_workers)
    ]
    prefixes = [[rng.getrandbits(60) for _ in range(10)] for _ in range(5)]
    index = KVIndex()
    for worker in rng.sample(workers, num_workers // 3):
        held = rng.choice(prefixes)[: rng.randint(1, 10)]
        index.apply(worker.worker_id, BlockStored(block_hashes=held))
    return workers, prefixes, index


@pytest.mark.parametrize("seed", range(12))
def test_a_list_given_again_places_as_the_scored_policy(seed):
    """The router actor passes one list until its registry changes: the heap's picks
    equal the scored kv picks through placements, ends, reports and a removal."""
    rng = random.Random(seed)
    workers, prefixes, index = make_cluster(rng, rng.choice([4, 30, 90]))
    settings = RouterSettings(load_weight=rng.choice([0.0, 1.0]), disagg_min_tokens=64)
    scored, unscored = Router(settings), Router(settings)
    live = list(workers)
    for k in range(120):
        prompt = rng.choice(prefixes)[: rng.randint(0, 10)] + [rng.getrandbits(60)]
        num_tokens = BLOCK * len(prompt) - rng.randint(0, 15)
        a = scored.choose(prompt, num_tokens, BLOCK, live, index)
        b = unscored.choose(prompt, num_tokens, BLOCK, live, index, scores=False)
        assert (b.decode, b.prefill, b.local_reason, b.best_cached_tokens) == (
            a.decode,
            a.prefill,
            a.local_reason,
            a.best_cached_tokens,
        )
        for router, placement in ((scored, a), (unscored, b)):
            router.on_placed(k, placement)
        ended = rng.randrange(k + 1)
        reporter = rng.choice(live)
        load = {
            "num_running": 1,
            "num_queued_tokens": rng.choice([0, 64, 200]),
            "kv_usage": rng.choice([0.0, 0.25]),
        }
        for router in (scored, unscored):
            router.on_finished(ended)
            if k % 4 == 0:
                router.on_load_report(reporter, **load)
        if k == 60 and len(live) > 2:  # a worker leaves: the registry is a new list
            gone = live.pop(rng.randrange(len(live)))
            for router in (scored, unscored):
                router.on_worker_removed(gone.worker_id)
            index.remove_worker(gone.worker_id)
            live = list(live)
    split = unscored._splits[id(live)]
    assert split.least is not None  # the heap, not the scan, made the later picks
