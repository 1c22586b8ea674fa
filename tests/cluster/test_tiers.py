"""The node's cache actor on a real cluster: blocks a decode worker evicts go to the host
tier (shared memory) and on to the SSD tier, and come back as cached tokens with the
Engine's output; a corrupted SSD block is a miss and is recomputed; a SIGKILLed cache
actor costs hits, never requests, and its restart is attached again.

One decode worker with 24 device blocks: a 300-token prompt (18 full blocks) is evicted
by the next one. The host tier has 20 slots, so a third prompt's evictions push the
first prompt's blocks on to disk; the disk tier holds them all."""

import os
import signal
from pathlib import Path

import httpx
import pytest

from kvmesh import SamplingParams
from kvmesh.bench.cluster import start_cluster
from kvmesh.cache.host_tier import pool_bytes
from tests.polling import wait_until
from tests.prompts import random_prompt

pytestmark = pytest.mark.cluster

PROMPT_TOKENS = 300
FULL_BLOCKS = PROMPT_TOKENS // 16  # 18: what a repeat of the prompt may find cached
HOST_SLOTS = 20
RECORD_BYTES = 32768  # one block of the tiny model, float32


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ssd")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, disk_dir):
    host_gb = pool_bytes(HOST_SLOTS, RECORD_BYTES) / 2**30
    c = start_cluster(
        tmp_path_factory.mktemp("tiers"),
        tiny_model_dir,
        "kv.device_blocks=24",
        f"kv.host_gb={host_gb}",
        "kv.disk_gb=0.02",
        f"kv.disk_path={disk_dir}",
        "nodes.0.actors.2.count=0",
        "nodes.0.actors.3.count=1",
    )
    yield c
    assert c.stop() == 0


def complete(cluster, model: str, prompt: list[int]) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    response = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def expected_text(engine, prompt: list[int]) -> str:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], params)[0].text


def cached_tokens(result: dict) -> int:
    return result["usage"]["prompt_tokens_details"]["cached_tokens"]


def tier_metrics(cluster) -> dict[str, float]:
    lines = httpx.get(f"{cluster.url}/metrics", timeout=10).text.splitlines()
    return {
        key: float(value)
        for key, value in (line.rsplit(" ", 1) for line in lines if line.startswith("kvmesh_kv_"))
    }


def evict_through_tiers(cluster, model, seeds: tuple[int, int, int]) -> list[int]:
    """Run three fresh prompts; the first one's blocks end up in the host and disk tiers.
    Returns the first prompt, extended by a token (a new request with its prefix)."""
    first, *others = (random_prompt(PROMPT_TOKENS, seed) for seed in seeds)
    for prompt in (first, *others):
        complete(cluster, model, prompt)
    return first + [40]


def test_evicted_prefix_comes_back_from_host_and_ssd(cluster, model_name, engine):
    onboard = 'kvmesh_kv_onboard_blocks_total{tier="%s"}'
    before = tier_metrics(cluster)
    prompt = evict_through_tiers(cluster, model_name, (7, 8, 9))
    again = complete(cluster, model_name, prompt)
    assert cached_tokens(again) == FULL_BLOCKS * 16
    assert again["choices"][0]["text"] == expected_text(engine, prompt)
    # The device kept none of the prompt's blocks (two 300-token prompts ran since), so
    # all 18 came from the tiers: some from SSD (the host holds 20 slots, and the third
    # prompt's evictions pushed the first one's out of it).
    offload = 'kvmesh_kv_offload_blocks_total{tier="%s"}'

    def settled():  # the cache actor's counters come in its periodic reports, apart from
        m = tier_metrics(cluster)  # the workers' (its disk hits once came a report late)
        onboarded = sum(
            m.get(onboard % t, 0) - before.get(onboard % t, 0) for t in ("host", "disk")
        )
        return (
            onboarded >= FULL_BLOCKS
            and m.get(offload % "host", 0) >= FULL_BLOCKS
            and m.get(offload % "disk", 0) > 0
            and m.get('kvmesh_kv_hit_rate{tier="disk"}', 0) > 0
            and m
        )

    metrics = wait_until(settled, "the tier counters of the prompt's trip", timeout=30)
    assert metrics[onboard % "disk"] - before.get(onboard % "disk", 0) > 0
    assert metrics[offload % "host"] >= FULL_BLOCKS
    assert metrics[offload % "disk"] > 0
    assert metrics['kvmesh_kv_hit_rate{tier="disk"}'] > 0


def test_corrupted_ssd_block_is_detected_and_recomputed(cluster, model_name, engine, disk_dir):
    prompt = evict_through_tiers(cluster, model_name, (17, 18, 19))
    files = sorted((disk_dir / "cache-0").glob("*.kv"))
    assert files, "nothing reached the SSD tier"
    for path in files:  # one payload bit of every block on disk
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(bytes(data))
    again = complete(cluster, model_name, prompt)
    assert again["choices"][0]["text"] == expected_text(engine, prompt)
    assert cached_tokens(again) < FULL_BLOCKS * 16  # part of it was only on disk: computed
    assert any(not path.exists() for path in files)  # found corrupt: deleted, not served


def test_sigkilled_cache_actor_costs_hits_not_requests(cluster, model_name, engine):
    before = cluster.status()["cache-0"]["pid"]
    os.kill(before, signal.SIGKILL)
    # Requests go on while the cache actor is down (and as it comes back).
    prompt = random_prompt(PROMPT_TOKENS, 27)
    result = complete(cluster, model_name, prompt)
    assert result["choices"][0]["text"] == expected_text(engine, prompt)
    wait_until(
        lambda: (pid := cluster.status().get("cache-0", {}).get("pid")) and pid != before,
        "the launcher restarting the cache actor",
    )
    # The worker attaches to the new cache actor once it sees the old one dead: evicted
    # prefixes come back again. Each try is a fresh eviction cycle (a repeat would hit
    # the device pool); the first tries may predate the attach.
    for attempt in range(6):
        prompt = evict_through_tiers(
            cluster, model_name, (100 + 3 * attempt, 101 + 3 * attempt, 102 + 3 * attempt)
        )
        again = complete(cluster, model_name, prompt)
        assert again["choices"][0]["text"] == expected_text(engine, prompt)
        if cached_tokens(again) == FULL_BLOCKS * 16:
            return
    pytest.fail("after its restart, the cache actor's tiers never served a prefix again")
