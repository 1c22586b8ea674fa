"""The engine with a KV connector: evicted blocks offloaded, prefixes onboarded from host
DRAM and disk, corruption and failed loads recomputed; output always equal to a plain
engine's. Scheduler-level tests use a fake connector and assert exact block ids."""

import pytest
import torch

from kvmesh import Engine, SamplingParams
from kvmesh.cache.disk_tier import HEADER
from kvmesh.cache.host_tier import pool_bytes
from kvmesh.cache.store import Hit
from kvmesh.engine import kv_connector
from kvmesh.engine.block_manager import BlockManager
from kvmesh.engine.kv_connector import LocalTieredConnector
from kvmesh.engine.scheduler import Scheduler
from kvmesh.engine.sequence import Sequence, SequenceStatus
from kvmesh.gpu.block_pool import BlockPool
from kvmesh.gpu.kv_pack import pack_blocks
from kvmesh.gpu.model_config import RECORD_TAG_BYTES
from kvmesh.kv.block_hash import hash_blocks, wire_hash, wire_hashes
from kvmesh.transport.keys import hash_key
from tests.prompts import random_prompt

BLOCK = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(config) -> dict[str, list[int]]:
    """a: 6 full blocks and 4 tokens; b, c: unrelated, 15 full blocks each, so that either
    one evicts every block a 16-block pool cached before it."""
    return {
        name: random_prompt(n, seed, config.vocab_size)
        for name, n, seed in (("a", 100, 1), ("b", 240, 2), ("c", 240, 3))
    }


@pytest.fixture(scope="module")
def a_hashes(config, prompts) -> list[int]:
    """The engine's hashes of prompt a's 6 full blocks."""
    return hash_blocks(prompts["a"], BLOCK, salt=config.kv_salt("float32", BLOCK, hash_key(None)))


@pytest.fixture(scope="module")
def plain_engine(tiny_model_dir, prompts) -> Engine:
    """A plain engine that ran each prompt alone (as the tests do), all still cached."""
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=128)
    for prompt in prompts.values():
        engine.generate([prompt], GREEDY)
    return engine


@pytest.fixture(scope="module")
def reference(plain_engine, prompts) -> dict[str, list[int]]:
    """The plain engine's greedy output for each prompt."""
    return {name: plain_engine.generate([p], GREEDY)[0].token_ids for name, p in prompts.items()}


def cached_kv(engine: Engine, block_hashes: list[int]) -> torch.Tensor:
    """The KV of the blocks engine's prefix cache holds for block_hashes (all of them)."""
    block_ids = engine.pool.match_prefix(block_hashes)
    assert len(block_ids) == len(block_hashes), (len(block_ids), len(block_hashes))
    return pack_blocks(engine.kv_caches, block_ids)


@pytest.fixture
def make_connector(config):
    """make_connector(host_slots, disk_dir=None, disk_files=0) -> LocalTieredConnector
    for the tiny model's float32 blocks; closed after the test."""
    connectors = []
    record = config.kv_record_bytes(BLOCK, 4)

    def make(host_slots: int, disk_dir=None, disk_files: int = 0) -> LocalTieredConnector:
        connector = LocalTieredConnector(
            record, pool_bytes(host_slots, record), disk_dir, disk_files * (HEADER.size + record)
        )
        connectors.append(connector)
        return connector

    yield make
    for connector in connectors:
        connector.close()


# A host tier that a's 6 blocks and b's 15 overflow (a goes to disk), big enough that the
# step onboarding a (6 blocks promoted) offloads all 7 blocks it evicts too: 13 = 6 + 7.
# With fewer slots the promoted blocks are kept and some evicted ones are not offloaded.
HOST_OVER_DISK = 13


def make_engine(model_dir, connector, num_blocks: int = 16, **kwargs) -> Engine:
    return Engine.from_pretrained(
        model_dir, num_blocks=num_blocks, kv_connector=connector, **kwargs
    )


def run(engine: Engine, prompt: list[int]):
    return engine.generate([prompt], GREEDY)[0]


# ---- the engine with a LocalTieredConnector ----------------------------------------------


def test_evicted_prefix_comes_back_from_the_host_tier(
    tiny_model_dir, config, make_connector, prompts, a_hashes, plain_engine, reference
):
    connector = make_connector(host_slots=64)
    engine = make_engine(tiny_model_dir, connector)
    assert run(engine, prompts["a"]).num_cached_tokens == 0
    run(engine, prompts["b"])  # needs all 16 blocks: a's 6 cached ones are evicted
    assert engine.pool.match_prefix(a_hashes) == []
    assert connector.store.counters()["host"].offloaded == 6
    again = run(engine, prompts["a"])
    assert again.num_cached_tokens == 96  # every full block but none computed on device
    assert again.token_ids == reference["a"]
    metrics = connector.metrics()
    assert metrics["host"].onboarded == 6 and metrics["host"].failed == 0
    assert metrics["disk"].onboarded == 0
    # the onboarded blocks are in the device prefix cache now, byte for byte the KV a
    # plain engine computed; a third run hits them there
    assert torch.equal(cached_kv(engine, a_hashes), cached_kv(plain_engine, a_hashes))
    assert run(engine, prompts["a"]).num_cached_tokens == 96
    assert connector.metrics()["host"].onboarded == 6
    # onboarding a evicted blocks of b and loaded a into them: they were offloaded before
    # the load overwrote them, so b comes back intact as well
    again = run(engine, prompts["b"])
    assert again.token_ids == reference["b"]
    assert connector.metrics()["host"].onboarded > 6 and again.num_cached_tokens == 224
    salt = config.kv_salt("float32", BLOCK, hash_key(None))
    b_prefix = hash_blocks(prompts["b"], BLOCK, salt=salt)[:14]
    assert torch.equal(cached_kv(engine, b_prefix), cached_kv(plain_engine, b_prefix))


def test_prefix_comes_back_from_disk_through_a_tiny_host_tier(
    tiny_model_dir, make_connector, prompts, a_hashes, plain_engine, reference, tmp_path
):
    connector = make_connector(host_slots=HOST_OVER_DISK, disk_dir=tmp_path, disk_files=64)
    engine = make_engine(tiny_model_dir, connector)
    for name in ("a", "b", "c"):  # b evicts a to host; c evicts b to host, a to disk
        run(engine, prompts[name])
    assert [connector.store.tier_of(h) for h in wire_hashes(a_hashes)] == ["disk"] * 6
    again = run(engine, prompts["a"])
    assert again.num_cached_tokens == 96
    assert again.token_ids == reference["a"]
    metrics = connector.metrics()
    stored = connector.store.counters()
    assert metrics["disk"].onboarded == 6 and metrics["host"].onboarded == 0
    assert stored["disk"].offloaded > 0
    assert torch.equal(cached_kv(engine, a_hashes), cached_kv(plain_engine, a_hashes))


def test_step_keeps_the_hits_it_loads_from_its_own_offloads(
    tiny_model_dir, make_connector, prompts, a_hashes, reference, tmp_path
):
    # 8 slots: the step onboarding a promotes its 6 blocks into the host tier, then offloads
    # the 7 blocks it evicts. a's blocks are kept (looked up, not yet loaded): 2 of the 7
    # take the other 2 slots, 5 are not offloaded, and all of a loads.
    connector = make_connector(host_slots=8, disk_dir=tmp_path, disk_files=64)
    engine = make_engine(tiny_model_dir, connector)
    for name in ("a", "b", "c"):
        run(engine, prompts[name])
    offloaded = connector.store.counters()["host"].offloaded
    again = run(engine, prompts["a"])
    assert again.num_cached_tokens == 96
    assert again.token_ids == reference["a"]
    metrics = connector.metrics()
    stored = connector.store.counters()
    assert (stored["disk"].hits, metrics["disk"].onboarded) == (6, 6)
    assert metrics["disk"].failed == metrics["host"].failed == 0
    assert stored["host"].offloaded - offloaded == 2
    assert [connector.store.tier_of(h) for h in wire_hashes(a_hashes)] == ["host"] * 6


def test_host_tier_smaller_than_the_run_stages_it_a_window_at_a_time(
    tiny_model_dir, make_connector, prompts, a_hashes, plain_engine, reference, tmp_path
):
    # 4 slots, and prefill chunks of 4 blocks, so that no step evicts more blocks than the
    # host tier can take: a ends up on disk whole. The lookup stages a's first 4 blocks
    # (every slot holds one of the run, so the step's offloads find no slot that is not
    # kept); the load reads them, then stages and reads the last 2: all 6 load.
    connector = make_connector(host_slots=4, disk_dir=tmp_path, disk_files=64)
    engine = make_engine(tiny_model_dir, connector, max_num_batched_tokens=4 * BLOCK)
    for name in ("a", "b", "c"):
        run(engine, prompts[name])
    assert [connector.store.tier_of(h) for h in wire_hashes(a_hashes)] == ["disk"] * 6
    offloaded = connector.store.counters()["host"].offloaded
    again = run(engine, prompts["a"])
    assert again.num_cached_tokens == 96
    assert again.token_ids == reference["a"]
    metrics = connector.metrics()
    stored = connector.store.counters()
    assert (stored["disk"].hits, metrics["disk"].onboarded) == (6, 6)
    assert metrics["disk"].failed == 0
    assert stored["host"].offloaded == offloaded
    assert torch.equal(cached_kv(engine, a_hashes), cached_kv(plain_engine, a_hashes))


def test_corrupted_disk_block_is_a_miss_and_the_rest_is_recomputed(
    tiny_model_dir, make_connector, prompts, a_hashes, plain_engine, reference, tmp_path
):
    connector = make_connector(host_slots=HOST_OVER_DISK, disk_dir=tmp_path, disk_files=64)
    engine = make_engine(tiny_model_dir, connector)
    for name in ("a", "b", "c"):
        run(engine, prompts[name])
    bad = connector.store.disk.file_of(wire_hash(a_hashes[3]))
    data = bytearray(bad.read_bytes())
    data[HEADER.size + 1000] ^= 0x01  # one bit of the payload
    bad.write_bytes(bytes(data))
    again = run(engine, prompts["a"])
    assert again.num_cached_tokens == 48  # blocks 0-2 onboarded; 3 is a miss
    assert again.token_ids == reference["a"]
    assert connector.metrics()["disk"].onboarded == 3
    assert not bad.exists()  # the corrupt file is deleted, never served
    assert torch.equal(cached_kv(engine, a_hashes[:3]), cached_kv(plain_engine, a_hashes[:3]))


def test_host_slot_failing_its_checksum_at_load_is_recomputed(
    tiny_model_dir, make_connector, prompts, a_hashes, plain_engine, reference
):
    # The lookup finds all six blocks in the host tier; reading the fourth fails its
    # checksum, so the load stops there and the engine computes blocks 3-5 instead.
    connector = make_connector(host_slots=64)
    engine = make_engine(tiny_model_dir, connector)
    run(engine, prompts["a"])
    run(engine, prompts["b"])
    host = connector.store.host
    slot = host.lookup([wire_hash(a_hashes[3])])[0]
    host._payloads[slot, 1000] ^= 0x01
    again = run(engine, prompts["a"])
    assert again.num_cached_tokens == 48
    assert again.token_ids == reference["a"]
    metrics = connector.metrics()
    assert (metrics["host"].onboarded, metrics["host"].failed) == (3, 1)
    # the loaded blocks were published; the recomputed ones were cached after the step
    assert torch.equal(cached_kv(engine, a_hashes[:3]), cached_kv(plain_engine, a_hashes[:3]))
    assert len(engine.pool.match_prefix(a_hashes)) == 6


def test_preemption_with_a_connector_keeps_the_output(tiny_model_dir, make_connector, config):
    lengths = [60, 90, 120, 150]
    batch = [random_prompt(n, 10 + n, config.vocab_size) for n in lengths]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [
        o.token_ids
        for o in Engine.from_pretrained(tiny_model_dir, num_blocks=128).generate(batch, params)
    ]
    connector = make_connector(host_slots=64)
    # 26 blocks: the four prompts (27 blocks with their outputs) cannot all run at once
    engine = make_engine(tiny_model_dir, connector, num_blocks=26, max_num_batched_tokens=64)
    outs = engine.generate(batch, params)
    assert engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    # blocks evicted while a preempted sequence waited came back from the host tier
    metrics = connector.metrics()["host"]
    assert connector.store.counters()["host"].offloaded > 0
    assert metrics.onboarded > 0 and metrics.failed == 0


def test_connector_with_other_block_records_is_refused(tiny_model_dir):
    connector = LocalTieredConnector(1000, pool_bytes(4, 1000))
    try:
        with pytest.raises(ValueError, match="block records of 1000 bytes; this pool's are 32784"):
            make_engine(tiny_model_dir, connector)
    finally:
        connector.close()


def test_no_connector_records_no_evictions(tiny_model_dir, a_hashes, prompts):
    engine = make_engine(tiny_model_dir, None)
    run(engine, prompts["a"])
    run(engine, prompts["b"])
    assert engine.pool.match_prefix(a_hashes) == []  # a's blocks were evicted
    assert engine.pool.evicted is None and engine.pool.take_evicted() == []


# ---- LocalTieredConnector alone, on a small pool -------------------------------------------

H = [0xB0 + i for i in range(8)]  # block hashes; H[i] is offloaded from device block i
KV_SHAPE = (2, 8, 2, 1, 4)  # [2, num_blocks, block_size, num_kv_heads, head_dim], 2 layers
# the full-hash tag, then layers * K/V * block_size * heads * dim * float32
KV_RECORD = RECORD_TAG_BYTES + 2 * 2 * 2 * 1 * 4 * 4


def make_kv(fill: bool = True) -> list[torch.Tensor]:
    """Two float32 layers of 8 blocks; every element distinct when filled, else zeros."""
    n = torch.Size(KV_SHAPE).numel()
    return [
        torch.arange(layer * n, (layer + 1) * n, dtype=torch.float32).view(KV_SHAPE)
        if fill
        else torch.zeros(KV_SHAPE)
        for layer in range(2)
    ]


@pytest.fixture
def small_connector():
    """small_connector(host_slots, disk_dir=None, disk_files=64) -> a LocalTieredConnector
    for make_kv's blocks (over a disk tier of disk_files files in disk_dir)."""
    connectors = []

    def make(host_slots: int, disk_dir=None, disk_files: int = 64) -> LocalTieredConnector:
        connector = LocalTieredConnector(
            KV_RECORD,
            pool_bytes(host_slots, KV_RECORD),
            disk_dir,
            disk_files * (HEADER.size + KV_RECORD),
        )
        connectors.append(connector)
        return connector

    yield make
    for connector in connectors:
        connector.close()


def test_a_record_of_another_block_under_the_same_wire_hash_is_a_miss(small_connector):
    """Two full hashes that share their low 64 bits (the tiers' key): the second block's
    lookup finds the first one's record, and its load refuses it (the record's tag is
    the other full hash) instead of unpacking another block's KV."""
    connector = small_connector(host_slots=4)
    kv = make_kv()
    stored, other = H[0], H[0] | (7 << 100)  # wire_hash(other) == stored
    connector.save([(stored, 3)], kv)
    hits = connector.lookup([other])
    target = make_kv(fill=False)
    loaded = connector.load(hits, [5], target)

    assert [hit.block_hash for hit in hits] == [other]  # the tiers cannot tell them apart
    assert (loaded, connector.num_failed["host"]) == (0, 1)
    assert all(not layer.any() for layer in target)  # nothing unpacked
    again = connector.lookup([stored])
    assert connector.load(again, [5], target) == 1  # its own block loads
    assert all(torch.equal(t[:, 5], k[:, 3]) for t, k in zip(target, kv, strict=True))


def test_save_keeps_the_hits_looked_up_before_it(small_connector):
    connector = small_connector(host_slots=4)
    kv = make_kv()
    connector.save([(H[i], i) for i in range(4)], kv)  # the host tier is full
    hits = connector.lookup(H[:2])  # LRU order now: H2, H3, H0, H1
    connector.save([(H[i], i) for i in (4, 5, 6)], kv)  # H4, H5 evict H2, H3; H6 gets none
    assert [connector.store.tier_of(h) for h in H[:7]] == [
        "host",
        "host",
        None,
        None,
        "host",
        "host",
        None,
    ]
    dst = make_kv(fill=False)
    assert connector.load(hits, [6, 7], dst) == 2
    for layer in range(2):
        assert torch.equal(dst[layer][:, 6:], kv[layer][:, :2])
    assert connector.metrics()["host"].onboarded == 2


def test_hits_never_loaded_are_kept_for_one_save_only(small_connector):
    connector = small_connector(host_slots=2)
    kv = make_kv()
    connector.save([(H[0], 0), (H[1], 1)], kv)
    connector.lookup(H[:2])  # a run the scheduler then cut: never loaded
    connector.save([(H[2], 2)], kv)  # this step's save: every slot is kept
    assert connector.store.tier_of(H[2]) is None
    connector.save([(H[3], 3)], kv)  # the next step's: H0 may go
    assert [connector.store.tier_of(h) for h in H[:4]] == [None, "host", None, "host"]


@pytest.mark.parametrize("staged", [1, 3, None])  # records staged at once; None: all
def test_load_reads_the_run_and_unpacks_the_blocks_before_the_first_bad_one(
    small_connector, monkeypatch, staged
):
    if staged is not None:
        monkeypatch.setattr(kv_connector, "STAGING_BYTES", staged * KV_RECORD)
    connector = small_connector(host_slots=8)
    kv = make_kv()
    connector.save([(H[i], i) for i in range(4)], kv)
    hits = connector.lookup(H[:4])
    host = connector.store.host
    host._payloads[hits[2].slot, 5] ^= 0x01
    dst = make_kv(fill=False)
    assert connector.load(hits, [7, 5, 6, 4], dst) == 2
    for layer in range(2):
        assert torch.equal(dst[layer][:, [7, 5]], kv[layer][:, [0, 1]])
        assert not dst[layer][:, [4, 6]].any()  # the bad one and the one after: untouched
    metrics = connector.metrics()["host"]
    assert (metrics.onboarded, metrics.failed) == (2, 1)


def test_two_runs_longer_than_the_host_tier_both_load_in_one_step(small_connector, tmp_path):
    connector = small_connector(host_slots=2, disk_dir=tmp_path)
    kv = make_kv()
    for i in range(6):  # one block a step: each gets a slot, the older ones go to disk
        connector.save([(H[i], i)], kv)
    first, second = connector.lookup(H[:3]), connector.lookup(H[3:6])
    # the first run's window takes both slots (kept): the second waits for its load
    assert [hit.slot is None for hit in first + second] == [False, False, True] + [True] * 3
    connector.save([], kv)
    dst = make_kv(fill=False)
    assert connector.load(first, [0, 1, 2], dst) == 3
    assert connector.load(second, [3, 4, 5], dst) == 3
    for layer in range(2):
        assert torch.equal(dst[layer][:, :6], kv[layer][:, :6])
    metrics = connector.metrics()
    assert (metrics["disk"].onboarded, metrics["host"].onboarded) == (6, 0)
    assert metrics["disk"].failed == metrics["host"].failed == 0


def test_staging_a_run_at_load_evicts_none_of_the_step_s_other_runs(small_connector, tmp_path):
    connector = small_connector(host_slots=2, disk_dir=tmp_path, disk_files=2)
    kv = make_kv()
    for i in range(4):  # disk (full): H0, H1; host: H2, H3, on no disk
        connector.save([(H[i], i)], kv)
    first = connector.lookup([H[2], H[3], H[1]])  # H1 comes after the 2-slot window
    second = connector.lookup([H[0]])  # no slot left that is not kept: unstaged
    assert [hit.slot is None for hit in first + second] == [False, False, True, True]
    connector.save([], kv)
    dst = make_kv(fill=False)
    # staging H1 evicts H2 from host; the full disk may not drop H0 (the second run)
    # for it, so H2 is dropped instead
    assert connector.load(first, [2, 3, 1], dst) == 3
    assert [connector.store.tier_of(h) for h in H[:4]] == ["disk", "host", None, "host"]
    assert connector.load(second, [0], dst) == 1
    for layer in range(2):
        assert torch.equal(dst[layer][:, :4], kv[layer][:, :4])


# ---- BlockPool: eviction records ---------------------------------------------------------


@pytest.mark.parametrize("track", [False, True])
def test_pool_records_evicted_pairs_only_when_tracking(track):
    pool = BlockPool(4, 2, track_evictions=track)
    ids = pool.allocate(3)
    pool.cache_blocks(ids, [11, 12, 13], None)
    pool.free(ids)  # free queue: 3, 2, 1, 0 (tail first)
    assert pool.allocate(3) == [3, 2, 1]  # 3 was never cached; 2 and 1 are evicted
    assert pool.take_evicted() == ([(13, 2), (12, 1)] if track else [])
    assert pool.take_evicted() == []
    assert pool.evicted == ([] if track else None)


# ---- Scheduler with a fake connector: exact block ids --------------------------------


class FakeConnector:
    """Holds the block hashes it is given; loads all but the blocks named in `fail`."""

    record_bytes = 0

    def __init__(self, held=(), fail=()) -> None:
        self.held = list(held)
        self.fail = set(fail)
        self.lookups: list[list[int]] = []

    def lookup(self, block_hashes, prefetched=None):
        self.lookups.append(list(block_hashes))
        hits = []
        for block_hash in block_hashes:
            if block_hash not in self.held:
                break
            hits.append(Hit(block_hash, self.held.index(block_hash), "host"))
        return hits

    def load(self, hits, block_ids, kv_caches):
        return next((i for i, hit in enumerate(hits) if hit.block_hash in self.fail), len(hits))


SMALL = 4


def make_seq(name: str, num_tokens: int, remote: bool = False) -> Sequence:
    return Sequence(name, list(range(100, 100 + num_tokens)), SamplingParams(), remote)


def make_scheduler(connector, num_blocks: int = 16, budget: int = 8) -> tuple[Scheduler, BlockPool]:
    pool = BlockPool(num_blocks, SMALL, track_evictions=connector is not None)
    return Scheduler(BlockManager(pool, connector=connector), 8, budget), pool


def test_onboarded_blocks_get_fresh_blocks_count_as_cached_and_cost_no_budget():
    hashes = hash_blocks(list(range(100, 118)), SMALL)  # 18 tokens: 4 full blocks
    connector = FakeConnector(held=hashes)
    scheduler, pool = make_scheduler(connector, budget=8)
    seq = make_seq("a", 18)
    scheduler.add(seq)
    batch = scheduler.schedule()
    [onboarding] = batch.onboards
    assert onboarding.block_ids == [0, 1, 2, 3] and onboarding.reported
    assert [hit.block_hash for hit in onboarding.hits] == hashes
    assert [(s.request_id, n) for s, n in batch.items] == [("a", 2)]  # 16 + 2 tokens
    assert seq.block_table == [0, 1, 2, 3, 4]
    assert (seq.num_computed_tokens, seq.num_cached_tokens) == (16, 16)
    assert pool.match_prefix(hashes) == []  # not before it loads
    scheduler.finish_onboard(onboarding, 4)
    assert pool.match_prefix(hashes) == [0, 1, 2, 3]
    assert seq.num_registered_blocks == 4


def test_a_failed_load_rewinds_to_the_loaded_blocks():
    hashes = hash_blocks(list(range(100, 118)), SMALL)
    scheduler, pool = make_scheduler(FakeConnector(held=hashes, fail=[hashes[2]]), budget=8)
    seq = make_seq("a", 18)
    scheduler.add(seq)
    batch = scheduler.schedule()
    scheduler.finish_onboard(batch.onboards[0], 2)
    assert (seq.num_computed_tokens, seq.num_cached_tokens) == (8, 8)
    assert pool.match_prefix(hashes) == [0, 1]
    assert [(s.request_id, n) for s, n in batch.items] == [("a", 2)]  # now tokens 8-9
    assert seq.block_table == [0, 1, 2, 3, 4]  # the failed blocks get computed in place


def test_whole_sequence_held_still_computes_its_last_block():
    tokens = list(range(100, 116))  # exactly 4 blocks, all held
    connector = FakeConnector(held=hash_blocks(tokens, SMALL))
    scheduler, _ = make_scheduler(connector)
    seq = make_seq("a", 16)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert connector.lookups == [hash_blocks(tokens, SMALL)[:3]]
    assert len(batch.onboards[0].block_ids) == 3
    assert [(s.request_id, n) for s, n in batch.items] == [("a", 4)]


def test_onboarding_is_cut_to_the_room_in_the_pool():
    tokens = list(range(100, 140))  # 10 full blocks, all held
    connector = FakeConnector(held=hash_blocks(tokens, SMALL))
    scheduler, _ = make_scheduler(connector, num_blocks=6, budget=4)
    seq = make_seq("a", 40)
    scheduler.add(seq)
    batch = scheduler.schedule()
    # 5 blocks onboarded + 1 for the 4 tokens the budget allows: the pool's 6
    assert batch.onboards[0].block_ids == [0, 1, 2, 3, 4]
    assert [(s.request_id, n) for s, n in batch.items] == [("a", 4)]
    assert seq.block_table == [0, 1, 2, 3, 4, 5]


def test_a_sequence_that_does_not_fit_is_not_looked_up():
    connector = FakeConnector()
    scheduler, _ = make_scheduler(connector, num_blocks=4, budget=32)
    scheduler.add(make_seq("a", 16))
    scheduler.add(make_seq("b", 20))
    batch = scheduler.schedule()
    assert [(s.request_id, n) for s, n in batch.items] == [("a", 16)]
    assert len(connector.lookups) == 1  # b waits without asking the connector


def test_remote_prefill_onboards_and_reports_the_loaded_blocks_as_cached():
    tokens = list(range(100, 118))
    hashes = hash_blocks(tokens, SMALL)
    scheduler, _ = make_scheduler(FakeConnector(held=hashes[:2]))
    seq = make_seq("a", 18, remote=True)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.items == [] and seq.status is SequenceStatus.REMOTE_PREFILL
    scheduler.finish_onboard(batch.onboards[0], 2)
    assert seq.block_table == [0, 1, 2, 3, 4] and seq.num_computed_tokens == 8


def test_no_connector_admits_exactly_as_before():
    scheduler, pool = make_scheduler(None)
    seq = make_seq("a", 18)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.onboards == [] and seq.block_table == [0, 1]
    assert pool.ref_counts[:3] == [1, 1, 0]
