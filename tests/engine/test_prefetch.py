"""Connector lookups prefetched before admission: the engine with a CacheActorConnector
onboards what the prefetch found and never asks the tiers at admission; no prefetch is
no hit; a stale prefetched hit fails its check at load and is computed; a prefetch of a
host tier since replaced is a miss. Prefetch.run and DevicePrefix alone, exactly."""

import dataclasses

import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.cache.host_tier import HostTier, pool_bytes
from kvmesh.cache.store import Hit, TieredStore
from kvmesh.engine.kv_connector import CacheActorConnector
from kvmesh.engine.prefetch import DevicePrefix, Prefetch, named
from kvmesh.kv.block_hash import wire_hash, wire_hashes
from kvmesh.kv.segment import segment_name
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored, OnboardCounters
from tests.prompts import random_prompt

BLOCK = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class StoreChannel:
    """The cache actor's answers, from a TieredStore in this process (what CacheClient
    asks it over ZeroMQ); it has no blocking lookup for the engine thread to call."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store
        self.shm_name = store.host.segment.name

    def prefetch(self, block_hashes: list[int]) -> Prefetch:
        hits = self.store.get_leading(wire_hashes(block_hashes))
        return Prefetch(tuple(named(hits, block_hashes)), self.shm_name)

    def stage(self, block_hashes, keep):
        return self.store.stage(block_hashes, keep), self.shm_name

    def reserve(self, block_hashes, keep):
        kept = frozenset(keep)
        return [self.store.reserve(block_hash, kept) for block_hash in block_hashes], self.shm_name

    def finish(self, committed, aborted):
        for block_hash in committed:
            self.store.commit(block_hash)
        for block_hash in aborted:
            self.store.abort(block_hash)


@pytest.fixture(scope="module")
def prompts(config) -> dict[str, list[int]]:
    """a: 6 full blocks and 4 tokens; b: 15 full blocks, evicting a from a 16-block pool."""
    return {
        name: random_prompt(n, seed, config.vocab_size)
        for name, n, seed in (("a", 100, 1), ("b", 240, 2))
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts) -> dict[str, list[int]]:
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=128)
    return {name: engine.generate([p], GREEDY)[0].token_ids for name, p in prompts.items()}


@pytest.fixture
def channel(config):
    record = config.kv_record_bytes(BLOCK, 4)
    host = HostTier.create(segment_name("test-prefetch"), record, pool_bytes(64, record))
    store = TieredStore(host)
    yield StoreChannel(store)
    store.close()


@pytest.fixture
def engine(tiny_model_dir, config, channel):
    """An engine whose connector asks `channel`, with a's blocks evicted to its host tier."""
    connector = CacheActorConnector(config.kv_record_bytes(BLOCK, 4), channel)
    connector.attach(HostTier.attach(channel.store.host.info))  # the worker's own mapping
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=16, kv_connector=connector)
    yield engine
    connector.detach()


def run(engine: Engine, prompt: list[int], prefetched: Prefetch | None = None):
    request_id = engine.add_request(prompt, GREEDY, prefetched=prefetched)
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                return out


def evict_a(engine: Engine, prompts) -> None:
    run(engine, prompts["a"])
    run(engine, prompts["b"])  # needs all 16 blocks: a's 6 go to the host tier


def test_prefetched_prefix_is_onboarded_and_none_without_a_prefetch(
    engine, channel, prompts, reference
):
    evict_a(engine, prompts)
    prefetched = channel.prefetch(engine.prefix_hashes(prompts["a"], GREEDY))
    assert len(prefetched.hits) == 6
    again = run(engine, prompts["a"], prefetched)
    assert again.num_cached_tokens == 96 and again.token_ids == reference["a"]
    assert engine.kv_connector.metrics()["host"] == OnboardCounters(onboarded=6, failed=0)
    run(engine, prompts["b"])  # a leaves the device again; the host tier still holds it
    alone = run(engine, prompts["a"])  # no prefetch: the engine asks nobody
    assert alone.num_cached_tokens == 0 and alone.token_ids == reference["a"]
    assert engine.kv_connector.metrics()["host"].onboarded == 6


def test_stale_prefetched_hit_fails_its_check_at_load_and_is_computed(
    engine, channel, prompts, reference
):
    evict_a(engine, prompts)
    hashes = engine.prefix_hashes(prompts["a"], GREEDY)
    prefetched = channel.prefetch(hashes)
    channel.store.host.remove(wire_hash(hashes[3]))  # its slot is given up after the lookup
    again = run(engine, prompts["a"], prefetched)
    assert again.num_cached_tokens == 48 and again.token_ids == reference["a"]
    assert engine.kv_connector.metrics()["host"] == OnboardCounters(onboarded=3, failed=1)


def test_prefetch_of_a_replaced_host_tier_is_a_miss(engine, channel, prompts, reference):
    evict_a(engine, prompts)
    prefetched = channel.prefetch(engine.prefix_hashes(prompts["a"], GREEDY))
    old = dataclasses.replace(prefetched, shm_name="a-cache-actor-since-restarted")
    again = run(engine, prompts["a"], old)
    assert again.num_cached_tokens == 0 and again.token_ids == reference["a"]
    assert engine.kv_connector.metrics()["host"] == OnboardCounters(onboarded=0, failed=0)


def test_prefix_hashes_are_admission_s_and_leave_the_last_token_s_block(engine, prompts):
    hashes = engine.prefix_hashes(prompts["b"], GREEDY)  # 240 tokens: 15 full blocks
    assert len(hashes) == 14
    request_id = engine.add_request(prompts["b"], GREEDY)
    assert engine.requests[request_id].seq.full_block_hashes(BLOCK, engine.salt)[:14] == hashes
    salted = SamplingParams(max_tokens=8, cache_salt="tenant")
    assert engine.prefix_hashes(prompts["b"], salted)[0] != hashes[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.prefix_hashes([10**9], GREEDY)


# ---- Prefetch.run and DevicePrefix ------------------------------------------------------

H = [0xC0 + i for i in range(6)]  # a prompt's chained block hashes


def make_prefetch(start: int, stop: int) -> Prefetch:
    """The tiers' run for blocks start..stop-1, the last two unstaged."""
    hits = [Hit(H[i], i if i < stop - 2 else None, "host") for i in range(start, stop)]
    return Prefetch(tuple(hits), "shm")


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        (H[2:6], H[2:6]),  # the device prefix as the prefetch assumed it
        (H[3:6], H[3:6]),  # grown by a block since: the rest of the run
        (H[4:5], H[4:5]),  # cut short (a block left to compute)
        (H[1:6], []),  # shrunk since: a gap before the run, nothing onboarded
        ([0xFF], []),
        ([], []),
    ],
)
def test_prefetch_run_answers_a_leading_run_of_what_it_asked(asked, expected):
    run = make_prefetch(2, 6).run(asked)
    assert [hit.block_hash for hit in run] == expected


def test_prefetch_run_stops_where_the_hashes_part():
    assert [hit.block_hash for hit in make_prefetch(0, 4).run([H[0], H[1], 0xFF])] == H[:2]
    assert [hit.slot for hit in make_prefetch(0, 4).run(H[2:4])] == [None, None]  # unstaged


def test_device_prefix_follows_the_device_pool_s_events_only():
    prefix = DevicePrefix()
    prefix.apply(
        [
            BlockStored(block_hashes=wire_hashes(H[:4])),
            BlockStored(block_hashes=wire_hashes(H[4:]), tier="host"),  # not the device's
        ]
    )
    assert prefix.num_leading(H) == 4
    prefix.apply([BlockRemoved(block_hashes=[wire_hash(H[1])])])
    assert prefix.num_leading(H) == 1 and prefix.num_leading(H[2:]) == 2
    prefix.apply([AllBlocksCleared(tier="disk")])
    assert prefix.num_leading(H) == 1
    prefix.apply([AllBlocksCleared()])
    assert prefix.num_leading(H) == 0
