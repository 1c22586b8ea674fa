"""A cached prefix longer than the host tier holds comes back whole: the connector stages
a long run through the host slots a window at a time (promote, read into device blocks,
the next window), in process, through the node's cache actor, and on a real cluster;
the output equals a plain engine's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import zmq

from kvmesh import Engine, SamplingParams
from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.actors.cache import CacheActor, CacheClient, CacheSettings
from kvmesh.bench.cluster import start_cluster
from kvmesh.cache.disk_tier import HEADER
from kvmesh.cache.host_tier import pool_bytes
from kvmesh.engine.kv_connector import CacheActorConnector, LocalTieredConnector
from kvmesh.kv.block_hash import hash_blocks, wire_hash, wire_hashes
from kvmesh.protocol import OnboardCounters
from kvmesh.transport.keys import hash_key
from tests.prompts import random_prompt

BLOCK = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
HOST_SLOTS = 4
LONG_BLOCKS = 20  # full blocks of the long prompt: five times what the host tier holds
DEVICE_BLOCKS = 32
# prefill chunks of HOST_SLOTS blocks: no step evicts more blocks than the host tier can
# take, so every block of the long prompt is offloaded (and ends up on disk)
CHUNK_TOKENS = HOST_SLOTS * BLOCK


@pytest.fixture(scope="module")
def record_bytes(config) -> int:
    return config.kv_record_bytes(BLOCK, 4)


@pytest.fixture(scope="module")
def prompts(config) -> dict[str, list[int]]:
    """long: LONG_BLOCKS full blocks and 4 tokens; b, c: unrelated, as long, so that each
    one evicts from a DEVICE_BLOCKS pool every block cached before it."""
    return {
        name: random_prompt(LONG_BLOCKS * BLOCK + 4, seed, config.vocab_size)
        for name, seed in (("long", 41), ("b", 42), ("c", 43))
    }


@pytest.fixture(scope="module")
def long_hashes(config, prompts) -> list[int]:
    salt = config.kv_salt("float32", BLOCK, hash_key(None))
    return hash_blocks(prompts["long"], BLOCK, salt=salt)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts) -> list[int]:
    """The plain engine's greedy output for the long prompt, computed uncached."""
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=128)
    return engine.generate([prompts["long"]], GREEDY)[0].token_ids


def make_engine(model_dir, connector) -> Engine:
    return Engine.from_pretrained(
        model_dir,
        num_blocks=DEVICE_BLOCKS,
        kv_connector=connector,
        max_num_batched_tokens=CHUNK_TOKENS,
    )


def run(engine: Engine, prompt: list[int], prefetched=None):
    request_id = engine.add_request(prompt, GREEDY, prefetched=prefetched)
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                return out


def evict_through_tiers(engine: Engine, prompts: dict[str, list[int]]) -> None:
    """Run long, then b and c: long leaves the device, then the host tier (for disk)."""
    for name in ("long", "b", "c"):
        run(engine, prompts[name])


# ---- in process: LocalTieredConnector ------------------------------------------------------


@pytest.fixture
def local_connector(record_bytes, tmp_path):
    connector = LocalTieredConnector(
        record_bytes,
        pool_bytes(HOST_SLOTS, record_bytes),
        tmp_path,
        128 * (HEADER.size + record_bytes),
    )
    yield connector
    connector.close()


def test_prefix_longer_than_the_host_tier_comes_back_whole(
    tiny_model_dir, local_connector, prompts, long_hashes, reference
):
    engine = make_engine(tiny_model_dir, local_connector)
    evict_through_tiers(engine, prompts)
    assert engine.pool.match_prefix(long_hashes) == []
    assert all(h not in local_connector.store.host for h in wire_hashes(long_hashes))
    assert all(h in local_connector.store.disk for h in wire_hashes(long_hashes))
    again = run(engine, prompts["long"])
    assert again.num_cached_tokens == LONG_BLOCKS * BLOCK
    assert again.token_ids == reference
    metrics, stored = local_connector.metrics(), local_connector.store.counters()
    assert (stored["disk"].hits, metrics["disk"].onboarded) == (LONG_BLOCKS, LONG_BLOCKS)
    assert metrics["disk"].failed == metrics["host"].failed == 0


def test_a_block_failing_its_checks_in_a_later_window_rewinds_the_rest(
    tiny_model_dir, local_connector, prompts, long_hashes, reference
):
    engine = make_engine(tiny_model_dir, local_connector)
    evict_through_tiers(engine, prompts)
    bad = local_connector.store.disk.file_of(wire_hash(long_hashes[10]))  # in the third window
    data = bytearray(bad.read_bytes())
    data[HEADER.size + 1000] ^= 0x01  # one bit of the payload
    bad.write_bytes(bytes(data))
    again = run(engine, prompts["long"])
    assert again.num_cached_tokens == 10 * BLOCK  # blocks 0-9 onboarded; 10 on, computed
    assert again.token_ids == reference
    assert not bad.exists()  # found corrupt as its window was staged: deleted, not served
    metrics = local_connector.metrics()["disk"]
    assert (metrics.onboarded, metrics.failed) == (10, 1)


# ---- through the node's cache actor: CacheActorConnector -------------------------------------


def make_config(actor_id: str) -> ActorConfig:
    return ActorConfig(
        actor_id=actor_id, heartbeat_interval=0.1, liveness=5, grace_period=2.0, linger=0.5
    )


class Worker(Actor):
    """Stands in for a decode worker: an Engine whose connector asks the cache actor."""

    role = "decode"

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)


def test_prefix_longer_than_the_host_tier_comes_back_whole_through_the_cache_actor(
    tiny_model_dir, record_bytes, prompts, long_hashes, reference, tmp_path
):
    settings = CacheSettings(
        endpoint="tcp://127.0.0.1:0",
        events_endpoint="tcp://127.0.0.1:0",
        router_endpoint=None,
        record_bytes=record_bytes,
        host_bytes=pool_bytes(HOST_SLOTS, record_bytes),
        disk_path=str(tmp_path),
        disk_bytes=128 * (HEADER.size + record_bytes),
    )

    async def scenario():
        async with (
            CacheActor(make_config("cache-0"), settings) as cache,
            Worker(make_config("decode-0")) as worker,
        ):
            client = CacheClient(worker, cache.actor_id, cache.endpoints["from_peers"])
            connector = CacheActorConnector(record_bytes, client)
            connector.attach(await client.attach(record_bytes, connect_timeout=5))
            engine = await asyncio.to_thread(make_engine, tiny_model_dir, connector)
            await asyncio.to_thread(evict_through_tiers, engine, prompts)
            where = [cache.store.tier_of(h) for h in wire_hashes(long_hashes)]
            # as a worker does: the lookup on the event loop, the engine never asks
            prefetched = await client.prefetch(engine.prefix_hashes(prompts["long"], GREEDY))
            again = await asyncio.to_thread(run, engine, prompts["long"], prefetched)
            return where, again, cache.load(), connector.metrics()

    where, again, load, metrics = asyncio.run(scenario())
    assert where == ["disk"] * LONG_BLOCKS
    assert again.num_cached_tokens == LONG_BLOCKS * BLOCK
    assert again.token_ids == reference
    assert load.tiers["disk"].hits == LONG_BLOCKS
    assert metrics["disk"] == OnboardCounters(onboarded=LONG_BLOCKS, failed=0)


# ---- a real cluster: one decode worker and the node's cache actor ----------------------------

# The finding: a 0.5 MB host tier (16 slots of the tiny model's 32 KiB blocks) over a
# disk tier, a 30-block prefix. Prefill chunks of 8 blocks, so that every step's
# evictions get host slots and the whole prefix reaches the disk.
CLUSTER_BLOCKS = 30
CLUSTER_TOKENS = CLUSTER_BLOCKS * BLOCK + 4


@pytest.fixture(scope="module")
def cluster_disk(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ssd")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, cluster_disk):
    c = start_cluster(
        tmp_path_factory.mktemp("long-onboard"),
        tiny_model_dir,
        "kv.device_blocks=40",
        "kv.host_gb=0.0005",
        "kv.disk_gb=0.02",
        f"kv.disk_path={cluster_disk}",
        "nodes.0.actors.2.count=0",
        "nodes.0.actors.3.count=1",
        f"nodes.0.actors.3.max_num_batched_tokens={8 * BLOCK}",
    )
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


def complete(url: str, model: str, prompt: list[int]) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.cluster
def test_prefix_longer_than_the_host_tier_comes_back_whole_on_a_cluster(
    cluster, tiny_model_dir, config
):
    model = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]
    prompts = [random_prompt(CLUSTER_TOKENS, seed, config.vocab_size) for seed in (51, 52, 53)]
    first, *others = prompts
    for prompt in (first, *others):  # each evicts the one before from the 40-block pool
        complete(cluster.url, model, prompt)
    prompt = first + [40]
    again = complete(cluster.url, model, prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == CLUSTER_BLOCKS * BLOCK
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=128)
    assert again["choices"][0]["text"] == engine.generate([prompt], GREEDY)[0].text
