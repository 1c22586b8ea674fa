"""`kvmesh bench index`: KVIndex lookups/s and events/s on a Mooncake trace, against
baselines measured in the same run.

Replay. Each trace line's `hash_ids` (one id per 512-token block, chained: equal ids mean
equal prefixes) become 64-bit block hashes (XXH3-64 of the id). A kvmesh Router (policy
kv, no load reports, `in_flight` requests outstanding) places each request on one of
`workers` simulated workers; each worker keeps an LRU cache of `capacity_blocks` blocks
and emits what a real pool would: BlockRemoved for the blocks it evicts, BlockStored for
the request's blocks it did not hold. That gives one op stream, built once, untimed:

    lookup(request 0's hashes), events of request 0, lookup(request 1's hashes), ...

Every index under test replays the same stream from empty; lookups and events are
timed apart (perf_counter around each call), best of `repeats` replays. Indexes:
  kvmesh    kvmesh.router.kv_index.KVIndex
  naive     one dict per worker (hash -> tier mask), each walked from the front: the
            obvious design, the in-run baseline
  dynamo    dynamo.llm.RadixTree (ai-dynamo-runtime), when importable; events are
            pre-encoded to its JSON bytes outside the timed region, each block hash
            serving as both its block_hash and tokens_hash
All three must report the same leading-block count per worker for every lookup; the
result says how many lookups disagreed (0 expected). Then Router.choose (policy kv,
`workers` decode workers plus workers // 2 prefill workers) replays the stream in place
of the lookups: a whole routing decision, index lookup included.

Last, the block hash itself (what every frontend computes per request and every worker
per block; the router only looks hashes up): kvmesh's keyed BLAKE2b-128 chain against
the unkeyed XXH3-64 chain it replaced, both over the same random 16-token blocks and
salt, ns per block. The index above keys blocks by 64-bit wire hashes either way.
"""

from __future__ import annotations

import json
import struct
import time
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import click
import xxhash

from kvmesh.bench.trace import default_trace_path
from kvmesh.progress import Progress
from kvmesh.protocol import TIERS, AllBlocksCleared, BlockRemoved, BlockStored
from kvmesh.router.kv_index import KVIndex, Overlap
from kvmesh.router.policy import Router, RouterSettings, WorkerState

TRACE_BLOCK_TOKENS = 512  # Mooncake: one hash id per 512 prompt tokens
DYNAMO_INSTALL_HINT = (
    "to compare with it, pip install ai-dynamo-runtime "
    "(or kvmesh[bench]; Linux x86_64/aarch64 wheels, ~75 MB)"
)


def load_trace(trace_path: Path) -> list[list[int]]:
    """Each request's block hashes: the trace's hash ids mapped to 64-bit ints."""
    if not trace_path.is_file():
        raise click.ClickException(
            f"trace not found: {trace_path} (pass --trace PATH to a Mooncake JSONL trace "
            "with a hash_ids list on each line)"
        )
    requests = []
    with trace_path.open() as lines:
        for line_no, line in enumerate(lines, 1):
            try:
                ids = json.loads(line)["hash_ids"]
            except (ValueError, KeyError) as exc:
                raise click.ClickException(f"{trace_path}:{line_no}: no hash_ids ({exc})") from None
            requests.append([_hash_id(i) for i in ids])
    return requests


def make_ops(
    requests: list[list[int]], num_workers: int, capacity_blocks: int, in_flight: int
) -> tuple[list[tuple], dict]:
    """The replay's op stream: ("lookup", hashes) and ("event", worker, event), in order."""
    router = Router(RouterSettings(policy="kv"))
    index = KVIndex()
    workers = [WorkerState(worker_id=f"w{i}", role="decode") for i in range(num_workers)]
    caches: dict[str, OrderedDict[int, None]] = {w.worker_id: OrderedDict() for w in workers}
    ops: list[tuple] = []
    hit_blocks = 0
    for request_id, hashes in enumerate(requests):
        ops.append(("lookup", hashes))
        placement = router.choose(
            hashes, len(hashes) * TRACE_BLOCK_TOKENS, TRACE_BLOCK_TOKENS, workers, index
        )
        router.on_placed(request_id, placement)
        if request_id >= in_flight:
            router.on_finished(request_id - in_flight)
        hit_blocks += placement.expected_cached_tokens // TRACE_BLOCK_TOKENS
        worker_id = placement.decode
        for event in _worker_events(caches[worker_id], hashes[:capacity_blocks], capacity_blocks):
            index.apply(worker_id, event)
            ops.append(("event", worker_id, event))
    stats = {
        "requests": len(requests),
        "blocks": sum(map(len, requests)),
        "unique_blocks": len({h for r in requests for h in r}),
        "events": sum(op[0] == "event" for op in ops),
        "hit_blocks": hit_blocks,
    }
    stats["event_blocks"] = sum(len(op[2].block_hashes) for op in ops if op[0] == "event")
    stats["hit_rate"] = hit_blocks / max(1, stats["blocks"])
    return ops, stats


def _worker_events(cache: OrderedDict[int, None], hashes: list[int], capacity: int) -> list:
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


class NaiveIndex:
    """The obvious index: one dict per worker (hash -> tier mask), each walked from the
    front. Answers what KVIndex answers (per-tier Overlap), so the race is fair."""

    def __init__(self) -> None:
        self.blocks: dict[Hashable, dict[int, int]] = {}

    def apply(self, worker_id: Hashable, event) -> None:
        blocks = self.blocks.setdefault(worker_id, {})
        bit = 1 << TIERS.index(event.tier)
        if isinstance(event, BlockStored):
            for h in event.block_hashes:
                blocks[h] = blocks.get(h, 0) | bit
            return
        hashes = list(blocks) if isinstance(event, AllBlocksCleared) else event.block_hashes
        for h in hashes:
            if blocks.get(h, 0) & bit:
                blocks[h] &= ~bit
                if not blocks[h]:
                    del blocks[h]

    def overlaps(self, block_hashes: list[int]) -> dict[Hashable, Overlap]:
        matches = {}
        for worker_id, blocks in self.blocks.items():
            counts = [0] * len(TIERS)
            for h in block_hashes:
                mask = blocks.get(h)
                if mask is None:
                    break
                counts[(mask & -mask).bit_length() - 1] += 1  # fastest tier
            if any(counts):
                matches[worker_id] = Overlap._make(counts)
        return matches


class ChooseAdapter:
    """Times Router.choose (policy kv, index lookup included) where replay times overlaps."""

    def __init__(self, num_workers: int) -> None:
        self.index = KVIndex()
        self.router = Router(RouterSettings(policy="kv"))
        self.workers = [WorkerState(worker_id=f"w{i}", role="decode") for i in range(num_workers)]
        self.workers += [
            WorkerState(worker_id=f"p{i}", role="prefill") for i in range(max(1, num_workers // 2))
        ]
        self.apply = self.index.apply

    def overlaps(self, block_hashes: list[int]) -> dict:
        self.router.choose(
            block_hashes,
            len(block_hashes) * TRACE_BLOCK_TOKENS,
            TRACE_BLOCK_TOKENS,
            self.workers,
            self.index,
        )
        return {}


def replay(index, ops: list[tuple], encode=None, worker_key=None) -> dict:
    """Seconds spent in lookups and in events over one replay, and every lookup's answer."""
    lookup_s = event_s = 0.0
    answers = []
    clock = time.perf_counter
    for op in ops:
        if op[0] == "lookup":
            start = clock()
            answer = index.overlaps(op[1])
            lookup_s += clock() - start
            answers.append(answer)
        else:
            worker, event = op[1], op[2] if encode is None else encode(op[2])
            start = clock()
            index.apply(worker if worker_key is None else worker_key(worker), event)
            event_s += clock() - start
    return {"lookup_s": lookup_s, "event_s": event_s, "answers": answers}


def bench_index(
    trace_path: Path | str | None = None,
    *,
    workers: int = 4,
    capacity_blocks: int = 2048,
    in_flight: int = 16,
    repeats: int = 3,
    dynamo: bool = True,
) -> dict:
    """Lookups/s and events/s of KVIndex, the naive index and (if importable) Dynamo's
    RadixTree on one op stream built from the trace; see the module docstring."""
    trace_path = Path(trace_path) if trace_path is not None else default_trace_path()
    requests = load_trace(trace_path)
    with Progress("routing the trace (untimed)"):
        ops, stats = make_ops(requests, workers, capacity_blocks, in_flight)
    indexes = {"kvmesh": (KVIndex, {}), "naive": (NaiveIndex, {})}
    dynamo_reason = _add_dynamo(indexes, ops) if dynamo else "disabled (--no-dynamo)"
    result = {
        "trace": str(trace_path),
        "workers": workers,
        "capacity_blocks": capacity_blocks,
        "in_flight": in_flight,
        "repeats": repeats,
        **stats,
    }
    reference = None
    for name, (make_index, options) in indexes.items():
        with Progress(f"replaying into {name} (replays)", total=repeats) as progress:
            runs = [replay(make_index(), ops, **options) for _ in progress.track(range(repeats))]
        lookup_s = min(run["lookup_s"] for run in runs)
        event_s = min(run["event_s"] for run in runs)
        totals = [_totals(answer) for answer in runs[0]["answers"]]
        reference = reference or totals
        result[name] = {
            "lookups_per_s": len(totals) / lookup_s,
            "lookup_us_mean": lookup_s / len(totals) * 1e6,
            "events_per_s": stats["events"] / event_s,
            "event_blocks_per_s": stats["event_blocks"] / event_s,
            "lookups_disagreeing": sum(a != b for a, b in zip(totals, reference, strict=True)),
        }
    choose_s = min(replay(ChooseAdapter(workers), ops)["lookup_s"] for _ in range(repeats))
    result["kvmesh_choose"] = {
        "choices_per_s": stats["requests"] / choose_s,
        "choose_us_mean": choose_s / stats["requests"] * 1e6,
    }
    result["block_hash"] = measure_block_hash(repeats=repeats)
    result["dynamo"] = result.get("dynamo")
    result["dynamo_unavailable"] = dynamo_reason
    for name in ("naive", "dynamo"):
        other = result[name]
        result[f"ratio_vs_{name}"] = (
            None if other is None else result["kvmesh"]["lookups_per_s"] / other["lookups_per_s"]
        )
    return result


def measure_block_hash(block_size: int = 16, num_blocks: int = 4096, repeats: int = 3) -> dict:
    """ns per block of hash_blocks (keyed BLAKE2b-128) and of the XXH3-64 chain it
    replaced, on the same tokens and salt; best of repeats."""
    import random

    from kvmesh.kv.block_hash import hash_blocks

    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(block_size * num_blocks)]
    salt = b"LlamaForCausalLM:" + b"f" * 32 + b":" + bytes(range(32))  # as kv_salt's

    def xxh3_chain() -> list[int]:
        hashes, parent = [], 0
        for start in range(0, len(tokens), block_size):
            block = tokens[start : start + block_size]
            parent = xxhash.xxh3_64_intdigest(
                struct.pack(f"<Q{block_size}I", parent, *block) + salt
            )
            hashes.append(parent)
        return hashes

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) / num_blocks * 1e9

    keyed = best(lambda: hash_blocks(tokens, block_size, salt=salt))
    xxh3 = best(xxh3_chain)
    return {
        "block_size": block_size,
        "blocks": num_blocks,
        "keyed_blake2b_128_ns": keyed,
        "xxh3_64_ns": xxh3,
        "ratio_vs_xxh3_64": keyed / xxh3,
    }


def _add_dynamo(indexes: dict, ops: list[tuple]) -> str | None:
    """Add Dynamo's RadixTree to `indexes`; the reason it is missing, or None."""
    try:
        from dynamo.llm import RadixTree
    except Exception as exc:  # ImportError, or a native library failing to load
        return (
            f"cannot import dynamo.llm.RadixTree ({type(exc).__name__}: {exc}); "
            f"{DYNAMO_INSTALL_HINT}"
        )

    class DynamoIndex:
        def __init__(self) -> None:
            self.tree = RadixTree()

        def apply(self, worker_id: int, event_bytes: bytes) -> None:
            self.tree.apply_event(worker_id, event_bytes)

        def overlaps(self, block_hashes: list[int]) -> dict:
            return {
                worker: n
                for (worker, _dp_rank), n in self.tree.find_matches(block_hashes).scores.items()
            }

    encoded = {id(op[2]): _dynamo_event(i, op[2]) for i, op in enumerate(ops) if op[0] == "event"}
    indexes["dynamo"] = (
        DynamoIndex,
        {"encode": lambda e: encoded[id(e)], "worker_key": _worker_number},
    )
    return None


def _dynamo_event(event_id: int, event) -> bytes:
    """`event` in the JSON form dynamo's RadixTree.apply_event reads."""
    if isinstance(event, BlockStored):
        blocks = [{"block_hash": h, "tokens_hash": h} for h in event.block_hashes]
        data = {"stored": {"parent_hash": event.parent_hash, "blocks": blocks}}
    elif isinstance(event, BlockRemoved):
        data = {"removed": {"block_hashes": event.block_hashes}}
    else:
        data = "cleared"
    return json.dumps({"event_id": event_id, "data": data}).encode()


def _totals(answer: dict) -> dict:
    """Leading-block count per worker, whatever the index's answer type; worker keys as
    names w0, w1, ... (dynamo takes integer worker ids: wN is N)."""
    return {
        (f"w{k}" if isinstance(k, int) else k): (v if isinstance(v, int) else v.num_blocks)
        for k, v in answer.items()
    }


def _worker_number(worker_id: str) -> int:
    return int(worker_id[1:])


def _hash_id(trace_id: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<Q", trace_id))


@click.command("index")
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Mooncake JSONL trace with hash_ids "
    "[default: the packaged kvmesh/bench/traces/mooncake_like.jsonl].",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Simulated workers the requests are routed to.",
)
@click.option(
    "--capacity-blocks",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Prefix-cache blocks per simulated worker (LRU).",
)
@click.option(
    "--in-flight",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Requests outstanding while routing the replay.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Timed replays per index; the best counts.",
)
@click.option("--no-dynamo", is_flag=True, help="Skip Dynamo's RadixTree even if installed.")
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results to this JSON file.",
)
def index_command(
    trace_path, workers, capacity_blocks, in_flight, repeats, no_dynamo, json_file
) -> None:
    """KVIndex overlaps() lookups/s and events/s on a trace, vs a naive index and Dynamo."""
    result = bench_index(
        trace_path,
        workers=workers,
        capacity_blocks=capacity_blocks,
        in_flight=in_flight,
        repeats=repeats,
        dynamo=not no_dynamo,
    )
    click.echo(
        f"trace {result['trace']}: {result['requests']} requests, {result['blocks']} "
        f"blocks ({result['unique_blocks']} distinct); {result['workers']} workers x "
        f"{result['capacity_blocks']} blocks; {result['events']} events; "
        f"hit rate {result['hit_rate']:.1%}"
    )
    for name in ("kvmesh", "naive", "dynamo"):
        r = result[name]
        if r is None:
            click.echo(f"{name:7s} n/a: {result['dynamo_unavailable']}")
            continue
        click.echo(
            f"{name:7s} {r['lookups_per_s']:10,.0f} lookups/s "
            f"({r['lookup_us_mean']:6.2f} us)  {r['events_per_s']:10,.0f} events/s  "
            f"{r['event_blocks_per_s']:12,.0f} blocks/s  "
            f"disagreeing lookups {r['lookups_disagreeing']}"
        )
    choose = result["kvmesh_choose"]
    click.echo(
        f"kvmesh Router.choose (kv, {result['workers']} decode + "
        f"{max(1, result['workers'] // 2)} prefill workers): "
        f"{choose['choices_per_s']:10,.0f} choices/s ({choose['choose_us_mean']:6.2f} us)"
    )
    ratios = [
        f"kvmesh vs {name} {result[f'ratio_vs_{name}']:.2f}x"
        for name in ("naive", "dynamo")
        if result[f"ratio_vs_{name}"] is not None
    ]
    click.echo("lookups/s ratio: " + ", ".join(ratios))
    h = result["block_hash"]
    click.echo(
        f"block hash ({h['block_size']}-token blocks, frontends and workers): keyed "
        f"BLAKE2b-128 {h['keyed_blake2b_128_ns']:.0f} ns/block vs XXH3-64 "
        f"{h['xxh3_64_ns']:.0f} ns/block ({h['ratio_vs_xxh3_64']:.2f}x); the index "
        "keys 64-bit wire hashes either way"
    )
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))
