"""`kvmesh bench tiers --cluster`: the same multi-turn chats through real clusters, where
the tiers are the node's cache actor (kvmesh.actors.cache) and the worker reaches them by
message and shared memory.

One cluster per configuration (`kvmesh up` on free ports: frontend, router, one decode
worker with the same device pool, and for host / host_disk the cache actor):

    device     nodes.0.actors.4.count=0: no cache actor
    host       kv.host_gb = the whole working set (plus one pool of slack)
    host_disk  kv.host_gb = `host_blocks`, kv.disk_gb = the whole working set, in a
               fresh directory deleted after

The prompts are the in-process device-only run's (each turn carries the previous turns'
greedy outputs), sent in the same order, one at a time, as streaming completions of token
ids. TTFT is measured at the client: from the request until the first token's event, so
it includes HTTP, routing and the actors' messaging, the same for every configuration.
Every reply's text must equal the in-process Engine's. Hit rate: the replies'
usage.prompt_tokens_details.cached_tokens / prompt tokens.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from kvmesh.bench.cluster import start_cluster
from kvmesh.bench.trace import (
    FIRST_TOKEN_ID,
    StreamRecord,
    http_client,
    stats,
    stream_completion,
)

CACHE_GROUP = 4  # the default node's [[nodes.actors]] entry of the cache actor


def replay_prompts(
    messages: list[list[list[int]]], outputs: list[list[int]], turns: int
) -> list[list[int]]:
    """The prompts run_conversations served, in its order, rebuilt from its outputs."""
    history: list[list[int]] = [[] for _ in messages]
    prompts, served = [], iter(outputs)
    for turn in range(turns):
        for chat, chat_messages in enumerate(messages):
            prompt = history[chat] + chat_messages[turn]
            prompts.append(prompt)
            history[chat] = prompt + next(served)
    return prompts


def cluster_overrides(
    name: str,
    pool_blocks: int,
    host_blocks: int,
    disk_blocks: int,
    record_bytes: int,
    disk_path: Path,
) -> list[str]:
    """`--set`s of one configuration's cluster (see the module doc)."""
    from kvmesh.cache.disk_tier import HEADER
    from kvmesh.cache.host_tier import pool_bytes

    overrides = [
        "nodes.0.actors.2.count=0",
        "nodes.0.actors.3.count=1",
        f"kv.device_blocks={pool_blocks}",
    ]
    if name == "device":
        return [*overrides, f"nodes.0.actors.{CACHE_GROUP}.count=0"]
    overrides.append(f"kv.host_gb={pool_bytes(host_blocks, record_bytes) / 2**30!r}")
    if disk_blocks:
        disk_gb = disk_blocks * (HEADER.size + record_bytes) / 2**30
        overrides += [f"kv.disk_gb={disk_gb!r}", f"kv.disk_path={disk_path}"]
    return overrides


async def replay_in_order(
    url: str, prompts: list[list[int]], max_tokens: int
) -> list[StreamRecord]:
    """Every prompt as a streaming completion, one at a time, in order (after one small
    request that connects the frontend to the worker)."""
    async with http_client(url) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await stream_completion(http, model, [FIRST_TOKEN_ID] * 3, 2)
        # logprobs: every token is an event, so the first one is timed even without text
        return [
            await stream_completion(http, model, prompt, max_tokens, logprobs=True)
            for prompt in prompts
        ]


def run_cluster(
    name: str,
    model_path: Path,
    overrides: list[str],
    prompts: list[list[int]],
    texts: list[str],
    max_tokens: int,
    work_dir: Path,
) -> dict:
    """One configuration's cluster serving every prompt in order."""
    cluster = start_cluster(work_dir, model_path, *overrides)
    try:
        records = asyncio.run(replay_in_order(cluster.url, prompts, max_tokens))
    finally:
        cluster.stop()
    failed = [r.error for r in records if r.error is not None]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} requests failed, e.g. {failed[0]}")
    prompt_tokens = sum(len(p) for p in prompts)
    cached = sum(r.usage["prompt_tokens_details"]["cached_tokens"] for r in records)
    equal = sum(r.text == expected for r, expected in zip(records, texts, strict=True))
    ttfts = [r.ttft for r in records]
    return {
        "hit_rate": cached / prompt_tokens,
        "cached_tokens": cached,
        "prompt_tokens": prompt_tokens,
        "outputs_equal_engine": equal,
        **stats(ttfts, "ttft"),
        "ttft_s": ttfts,
        "overrides": overrides,
    }


def bench_tiers_cluster(
    model_path: Path,
    messages,
    reference: tuple[list, list[str]],
    turns: int,
    max_tokens: int,
    pool_blocks: int,
    tiers: dict[str, tuple[int, int]],
    record_bytes: int,
    disk_dir: str | None,
) -> dict:
    """Every configuration once, through its own cluster; see the module doc."""
    outputs, texts = reference
    prompts = replay_prompts(messages, outputs, turns)
    root = Path(tempfile.mkdtemp(prefix="kvmesh-bench-tiers-cluster-", dir=disk_dir))
    try:
        configs = {}
        for name, (host_blocks, disk_blocks) in tiers.items():
            work_dir = root / name
            work_dir.mkdir()
            overrides = cluster_overrides(
                name, pool_blocks, host_blocks, disk_blocks, record_bytes, work_dir / "ssd"
            )
            configs[name] = run_cluster(
                name, model_path, overrides, prompts, texts, max_tokens, work_dir
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    device = configs["device"]["ttft_mean_s"]
    return {
        "configs": configs,
        "ttft_mean_vs_device": {
            name: c["ttft_mean_s"] / device for name, c in configs.items() if name != "device"
        },
    }


def report_cluster(result: dict) -> str:
    lines = [
        "through clusters (frontend, router, 1 decode worker, cache actor):",
        f"{'config':<10} {'hit rate':>8} {'TTFT mean':>10} {'p50':>8} "
        f"{'outputs = Engine':>17} {'vs device':>10}",
    ]
    for name, r in result["configs"].items():
        ratio = result["ttft_mean_vs_device"].get(name, 1.0)
        lines.append(
            f"{name:<10} {r['hit_rate']:>8.1%} {r['ttft_mean_s'] * 1e3:>8.1f}ms "
            f"{r['ttft_p50_s'] * 1e3:>6.1f}ms "
            f"{r['outputs_equal_engine']:>10}/{len(r['ttft_s']):<6} {ratio:>9.2f}x"
        )
    return "\n".join(lines)
