"""The workloads `kvmesh bench index` replays: request hash lists from a Mooncake trace or
from a multi-turn conversation trace made here, turned into one op stream of lookups
and the KV events a cluster of LRU workers would publish.

Conversation trace (`make_conversation_trace`), in 512-token blocks as Mooncake's:

    system prompt   one of `system_prompts` shared prompts, 2-12 blocks
    session         3-16 turns; turn k resends turn k-1's prompt, its reply and a new
                    user message: the history grows by 1-3 blocks a turn. Turn k-1's
                    last block was partial (90% of the time), so it changes and turn k
                    shares all of turn k-1's blocks but that last one.
    traffic         `concurrent` sessions open at once; each request is the next turn
                    of a random open one (think times interleave them); a finished
                    session is replaced by a new one until `num_requests` requests.

    turn 1   [S S S][a1 a2]
    turn 2   [S S S][a1][b1 b2 b3]            a2 was partial: b1 replaces it
    turn 3   [S S S][a1][b1 b2][c1 c2]

Ids are chained as Mooncake's: equal leading ids mean an equal prefix.
"""

from __future__ import annotations

import random
import struct
from collections import OrderedDict
from pathlib import Path

import click
import xxhash

from kvmesh.bench.trace import load_trace
from kvmesh.protocol import BlockRemoved, BlockStored
from kvmesh.router.kv_index import KVIndex
from kvmesh.router.policy import Router, RouterSettings, WorkerState

TRACE_BLOCK_TOKENS = 512  # Mooncake: one hash id per 512 prompt tokens
CONVERSATION = "conversation"  # --trace value naming the trace made here
LOOKUP_BATCH = 32  # requests looked up between two batches of their events


def load_requests(trace: str | Path) -> list[list[int]]:
    """Each request's block hashes: `CONVERSATION`'s, or a Mooncake JSONL file's."""
    if str(trace) == CONVERSATION:
        return [[_hash_id(i) for i in ids] for ids in make_conversation_trace()]
    try:
        records = load_trace(trace)
    except FileNotFoundError:
        raise click.ClickException(
            f"trace not found: {trace} (pass --trace PATH to a Mooncake JSONL trace "
            f"with a hash_ids list on each line, or --trace {CONVERSATION})"
        ) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return [[_hash_id(i) for i in record.hash_ids] for record in records]


def make_conversation_trace(
    num_requests: int = 4000, *, concurrent: int = 64, system_prompts: int = 8, seed: int = 0
) -> list[list[int]]:
    """Hash ids of `num_requests` multi-turn chat requests; see the module docstring."""
    rng = random.Random(seed)
    next_id = 0

    def new_ids(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    prompts = [new_ids(2 + int(rng.random() * 11)) for _ in range(system_prompts)]

    def new_session() -> list:  # [history ids, turns left, system prompt blocks]
        prompt = rng.choice(prompts)
        return [list(prompt), 3 + int(rng.random() * 14), len(prompt)]

    sessions = [new_session() for _ in range(concurrent)]
    requests = []
    while len(requests) < num_requests:
        slot = int(rng.random() * concurrent)
        history, turns_left, prompt_blocks = sessions[slot]
        if len(history) > prompt_blocks and rng.random() < 0.9:
            history.pop()  # the last block was partial: this turn rewrites it
        history += new_ids(1 + int(rng.random() * 3))
        requests.append(list(history))
        sessions[slot][1] -= 1
        if turns_left <= 1:
            sessions[slot] = new_session()
    return requests


def make_ops(
    requests: list[list[int]],
    num_workers: int,
    capacity_blocks: int,
    in_flight: int,
    batch: int = LOOKUP_BATCH,
) -> tuple[list[tuple], dict]:
    """The replay's op stream: ("lookups", [hashes, ...]) for `batch` requests, then
    ("events", [(worker, event), ...]) for what those requests made the workers emit.

    A kvmesh Router (policy kv, no load reports, `in_flight` requests outstanding)
    places each request on one of `num_workers` workers, each an LRU prefix cache of
    `capacity_blocks` blocks emitting BlockRemoved / BlockStored as a real pool would.
    The router sees every event at once; an index replaying the stream sees a batch's
    events after its lookups, as a router sees events a few requests late.
    """
    router = Router(RouterSettings(policy="kv"))
    index = KVIndex()
    workers = [WorkerState(worker_id=f"w{i}", role="decode") for i in range(num_workers)]
    caches: dict[str, OrderedDict[int, None]] = {w.worker_id: OrderedDict() for w in workers}
    ops: list[tuple] = []
    events: list[tuple[str, object]] = []
    hit_blocks = 0
    for request_id, hashes in enumerate(requests):
        if request_id % batch == 0:
            ops += [("events", events)] if events else []
            ops.append(("lookups", []))
            events = []
        ops[-1][1].append(hashes)
        placement = router.choose(
            hashes, len(hashes) * TRACE_BLOCK_TOKENS, TRACE_BLOCK_TOKENS, workers, index
        )
        router.on_placed(request_id, placement)
        if request_id >= in_flight:
            router.on_finished(request_id - in_flight)
        hit_blocks += placement.expected_cached_tokens // TRACE_BLOCK_TOKENS
        worker_id = placement.decode
        for event in worker_events(caches[worker_id], hashes[:capacity_blocks], capacity_blocks):
            index.apply(worker_id, event)
            events.append((worker_id, event))
    ops += [("events", events)] if events else []
    all_events = [item for kind, items in ops if kind == "events" for item in items]
    stats = {
        "requests": len(requests),
        "blocks": sum(map(len, requests)),
        "unique_blocks": len({h for r in requests for h in r}),
        "events": len(all_events),
        "event_blocks": sum(len(event.block_hashes) for _, event in all_events),
        "hit_blocks": hit_blocks,
        "hit_rate": hit_blocks / max(1, sum(map(len, requests))),
        "workers_used": len({worker for worker, _ in all_events}),
    }
    return ops, stats


def worker_events(cache: OrderedDict[int, None], hashes: list[int], capacity: int) -> list:
    """What a worker's LRU prefix cache emits when it serves a request with `hashes`.

    The request's blocks are touched last block first, so a prefix outlives its
    suffixes (as BlockPool frees a sequence tail-first); each run of missing blocks is
    one BlockStored under the block before it.
    """
    for h in reversed(hashes):
        if h in cache:
            cache.move_to_end(h)
    missing = [h for h in hashes if h not in cache]
    evicted = []
    while len(cache) + len(missing) > capacity:
        evicted.append(cache.popitem(last=False)[0])
    events = [BlockRemoved(block_hashes=evicted)] if evicted else []
    run: list[int] = []
    for position, h in enumerate(hashes):
        if h not in cache:
            run.append(h)
            if position + 1 < len(hashes) and hashes[position + 1] not in cache:
                continue
            first = position + 1 - len(run)
            events.append(
                BlockStored(block_hashes=run, parent_hash=hashes[first - 1] if first else None)
            )
            run = []
    cache.update(dict.fromkeys(missing))
    for h in reversed(hashes):
        cache.move_to_end(h)
    return events


def _hash_id(trace_id: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<Q", trace_id))
