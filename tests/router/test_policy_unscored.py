"""choose(scores=False), the router actor's fast path: the same placements as the scored
kv policy on random clusters, loads told through on_load_report and predictions."""

import random

import pytest

from kvmesh.protocol import BlockStored
from kvmesh.router.kv_index import KVIndex
from kvmesh.router.policy import Router, RouterSettings, WorkerState

BLOCK = 16


def random_cluster(rng: random.Random, num_workers: int):
    """Workers (a few prefill), an index of shared prefixes, and two routers told the
    same load reports and placements."""
    workers = [
        WorkerState(f"w{i}", "prefill" if i % 7 == 3 else "decode", capacity_tokens=4096)
        for i in range(num_workers)
    ]
    prefixes = [[rng.getrandbits(60) for _ in range(12)] for _ in range(6)]
    index = KVIndex()
    for worker in rng.sample(workers, num_workers // 2):
        held = rng.choice(prefixes)[: rng.randint(1, 12)]
        index.apply(
            worker.worker_id, BlockStored(block_hashes=held, tier=rng.choice(["device", "host"]))
        )
    settings = RouterSettings(load_weight=rng.choice([0.0, 0.5, 1.0]), disagg_min_tokens=64)
    routers = Router(settings), Router(settings)
    for worker in workers:
        if rng.random() < 0.7:  # some never report: load 0 plus predictions
            load = {
                "num_running": rng.randint(0, 3),
                "num_queued_tokens": rng.choice([0, 0, 100, 250]),
                "kv_usage": rng.choice([0.0, 0.0, 0.125, 0.5]),
            }
            for router in routers:
                router.on_load_report(worker, **load)
    return workers, prefixes, index, routers


@pytest.mark.parametrize("seed", range(20))
def test_unscored_placements_equal_the_scored_ones(seed):
    rng = random.Random(seed)
    workers, prefixes, index, (scored, unscored) = random_cluster(rng, rng.choice([3, 12, 40]))
    for k in range(30):
        prompt = rng.choice(prefixes)[: rng.randint(1, 12)] + [rng.getrandbits(60)]
        num_tokens = BLOCK * len(prompt) - rng.randint(0, 15)
        alive = [w for w in workers if rng.random() < 0.9]
        a = scored.choose(prompt, num_tokens, BLOCK, alive, index)
        b = unscored.choose(prompt, num_tokens, BLOCK, alive, index, scores=False)
        assert (b.decode, b.prefill, b.expected_cached_tokens, b.best_cached_tokens) == (
            a.decode,
            a.prefill,
            a.expected_cached_tokens,
            a.best_cached_tokens,
        )
        assert b.local_reason == a.local_reason
        assert b.decode_scores == {} and b.prefill_scores == {}
        for router, placement in ((scored, a), (unscored, b)):
            router.on_placed(k, placement)
        if k % 3 == 0:  # some end, some outlive a report
            for router in (scored, unscored):
                router.on_finished(k)
        if k % 5 == 0:
            worker = rng.choice(workers)
            for router in (scored, unscored):
                router.on_load_report(worker, num_running=1, num_queued_tokens=50, kv_usage=0.25)


def test_unscored_without_any_prefix_takes_the_least_loaded_then_lowest_id():
    workers = [WorkerState(w, "decode", capacity_tokens=1000) for w in ("c", "a", "b")]
    router = Router()
    router.on_load_report(workers[1], num_running=1, num_queued_tokens=5, kv_usage=0.0)
    placement = router.choose([1, 2], 40, BLOCK, workers, KVIndex(), scores=False)
    assert placement.decode == "b"  # b and c idle: the lower id
    assert placement.decode_scores == {}
