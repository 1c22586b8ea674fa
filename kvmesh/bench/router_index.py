"""`kvmesh bench index`: KVIndex lookups/s and events/s against a naive dict index and
Dynamo's RadixTree, measured in the same run, over a grid of traces x cluster sizes.

Workloads (kvmesh.bench.index_workload): each trace's requests are routed (untimed) by
a kvmesh Router onto `workers` simulated LRU workers, giving one op stream

    lookups of requests 0..31, their events, lookups of requests 32..63, their events, ...

Traces: Mooncake JSONL files (`hash_ids` per 512-token block, chained; the packaged
mooncake_like.jsonl by default, or Mooncake's public synthetic_trace.jsonl by path),
and `conversation`, a multi-turn chat trace made in code (shared system prompts,
sessions whose prefix grows turn by turn).

Every index under test replays the same stream from empty; lookups and events are
timed apart, batch by batch, in CPU seconds of the process (time.process_time: other
processes on a loaded machine do not count, Dynamo's own threads do). The indexes take
turns every 4 batch pairs (kvmesh, naive, dynamo, then naive, dynamo, kvmesh, ...), and
each stretch counts its fastest of `repeats` replays. Indexes:
  kvmesh    kvmesh.router.kv_index.KVIndex
  naive     one dict per worker (hash -> tier mask), each walked from the front: the
            obvious design, the in-run baseline
  dynamo    dynamo.llm.RadixTree (ai-dynamo-runtime), when importable; events are
            pre-encoded to its JSON bytes outside the timed region, each block hash
            serving as both its block_hash and tokens_hash
Every lookup's answer (leading blocks per worker) must be the same in all indexes: the
first difference stops the benchmark with an error naming the lookup (exit status 1).
Then Router.choose (policy kv, `workers` decode workers plus workers // 2 prefill
workers) replays the stream in place of the lookups: a whole routing decision.

Last, once per command, the block hash itself (what every frontend computes per request
and every worker per block; the router only looks hashes up): kvmesh's keyed
BLAKE2b-128 chain against the unkeyed XXH3-64 chain it replaced, both over the same
random 16-token blocks and salt, ns per block. The index keys 64-bit wire hashes either
way.
"""

from __future__ import annotations

import functools
import json
import struct
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import click
import xxhash

from kvmesh.bench.index_workload import (
    CONVERSATION,
    LOOKUP_BATCH,
    TRACE_BLOCK_TOKENS,
    load_requests,
    make_ops,
)
from kvmesh.bench.trace import default_trace_path
from kvmesh.progress import Progress
from kvmesh.protocol import TIERS, AllBlocksCleared, BlockRemoved, BlockStored
from kvmesh.router.kv_index import KVIndex, Overlap
from kvmesh.router.policy import Router, RouterSettings, WorkerState

DEFAULT_WORKERS = (8, 64, 1000)
CHUNK_OPS = 8  # batches each index replays in its turn (see _replay_in_turns)
IN_FLIGHT_PER_WORKER = 2  # requests outstanding per worker while routing, by default
INDEX_NAMES = ("kvmesh", "naive", "dynamo")
DYNAMO_INSTALL_HINT = (
    "to compare with it, pip install ai-dynamo-runtime "
    "(or kvmesh[bench]; Linux x86_64/aarch64 wheels, ~75 MB)"
)


class AnswerMismatch(click.ClickException):
    """Two indexes answered one lookup differently: the benchmark's numbers mean nothing."""


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
    """CPU seconds (this process's, all threads) spent in lookups and in events over
    `ops`, and every lookup's answer. Each batch is timed as a whole, less the cost of
    reading the clock; `encode` and `worker_key` turn kvmesh events and worker ids into
    the index's own, outside the timed region."""
    lookup_s = event_s = 0.0
    answers: list = []
    clock = time.process_time
    overhead = clock_overhead()
    overlaps, apply = index.overlaps, index.apply
    for kind, items in ops:
        if kind == "lookups":
            start = clock()
            batch = [overlaps(hashes) for hashes in items]
            lookup_s += max(0.0, clock() - start - overhead)
            answers += batch
            continue
        if encode is not None:
            items = [(worker_key(worker), encode(event)) for worker, event in items]
        start = clock()
        for worker, event in items:
            apply(worker, event)
        event_s += max(0.0, clock() - start - overhead)
    return {"lookup_s": lookup_s, "event_s": event_s, "answers": answers}


@functools.cache
def clock_overhead() -> float:
    """Seconds two back-to-back process_time() reads take (best of 200)."""
    clock = time.process_time
    best = float("inf")
    for _ in range(200):
        start = clock()
        best = min(best, clock() - start)
    return best


def bench_index(
    trace: Path | str | None = None,
    *,
    workers: int = 8,
    capacity_blocks: int = 2048,
    in_flight: int | None = None,
    repeats: int = 3,
    dynamo: bool = True,
    requests: list[list[int]] | None = None,
    lookup_batch: int = LOOKUP_BATCH,
) -> dict:
    """Lookups/s and events/s of KVIndex, the naive index and (if importable) Dynamo's
    RadixTree on one op stream built from `trace` (a path or "conversation"; its
    already loaded `requests` may be passed); see the module docstring. Raises
    AnswerMismatch when two indexes answer a lookup differently."""
    trace = trace if trace is not None else default_trace_path()
    requests = requests if requests is not None else load_requests(trace)
    in_flight = in_flight or IN_FLIGHT_PER_WORKER * workers
    with Progress(f"routing {len(requests)} requests onto {workers} workers (untimed)"):
        ops, stats = make_ops(requests, workers, capacity_blocks, in_flight, lookup_batch)
    indexes = {"kvmesh": (KVIndex, {}), "naive": (NaiveIndex, {})}
    dynamo_reason = _add_dynamo(indexes, ops) if dynamo else "disabled (--no-dynamo)"
    result = {
        "trace": str(trace),
        "workers": workers,
        "capacity_blocks": capacity_blocks,
        "in_flight": in_flight,
        "repeats": repeats,
        **stats,
    }
    times = _replay_in_turns(indexes, ops, repeats)
    for name in INDEX_NAMES:
        if name not in times:
            result[name] = None
            continue
        lookup_s, event_s = times[name]
        result[name] = {
            "lookups_per_s": stats["requests"] / lookup_s,
            "lookup_us_mean": lookup_s / stats["requests"] * 1e6,
            "events_per_s": stats["events"] / max(event_s, 1e-9),
            "event_blocks_per_s": stats["event_blocks"] / max(event_s, 1e-9),
        }
    choose_s = min(replay(ChooseAdapter(workers), ops)["lookup_s"] for _ in range(repeats))
    result["kvmesh_choose"] = {
        "choices_per_s": stats["requests"] / choose_s,
        "choose_us_mean": choose_s / stats["requests"] * 1e6,
    }
    result["dynamo_unavailable"] = dynamo_reason
    for name in ("naive", "dynamo"):
        other = result[name]
        result[f"ratio_vs_{name}"] = (
            None if other is None else result["kvmesh"]["lookups_per_s"] / other["lookups_per_s"]
        )
        result[f"events_ratio_vs_{name}"] = (
            None if other is None else result["kvmesh"]["events_per_s"] / other["events_per_s"]
        )
    return result


def _replay_in_turns(indexes: dict, ops: list[tuple], repeats: int) -> dict:
    """Per index, (lookup seconds, event seconds) over the op stream, robust to a loaded
    machine: the stream is cut into chunks of CHUNK_OPS ops and the indexes take turns
    chunk by chunk (rotating who goes first); each repeat starts from empty indexes, and
    each chunk counts its fastest repeat. The first repeat checks every answer."""
    names = list(indexes)
    starts = range(0, len(ops), CHUNK_OPS)  # each chunk: whole (lookups, events) pairs
    best = {name: [[float("inf"), float("inf")] for _ in starts] for name in names}
    with Progress(f"replaying into {', '.join(names)} (rounds)", total=repeats) as progress:
        for round_no in progress.track(range(repeats)):
            live = {name: make_index() for name, (make_index, _options) in indexes.items()}
            num_lookups = 0
            for chunk_no, start in enumerate(starts):
                chunk = ops[start : start + CHUNK_OPS]
                answers = {}
                turn = chunk_no % len(names)
                for name in names[turn:] + names[:turn]:
                    run = replay(live[name], chunk, **indexes[name][1])
                    times = best[name][chunk_no]
                    times[0] = min(times[0], run["lookup_s"])
                    times[1] = min(times[1], run["event_s"])
                    if round_no == 0:
                        answers[name] = [_totals(answer) for answer in run["answers"]]
                lookups = [h for kind, items in chunk if kind == "lookups" for h in items]
                for name in names[1:] if round_no == 0 else ():
                    check_answers(
                        (names[0], answers[names[0]]), (name, answers[name]), lookups, num_lookups
                    )
                num_lookups += len(lookups)
    return {name: tuple(map(sum, zip(*chunks, strict=True))) for name, chunks in best.items()}


def check_answers(
    reference: tuple[str, list], other: tuple[str, list], lookups: list, first: int = 0
) -> None:
    """Raise AnswerMismatch at the first lookup where `other`'s leading-block counts per
    worker differ from `reference`'s; each is (index name, per-lookup totals) for the
    requests `lookups`, numbered from `first` in the stream."""
    (ref_name, ref_totals), (name, totals) = reference, other
    for number, (want, got) in enumerate(zip(ref_totals, totals, strict=True)):
        if want != got:
            differ = sorted(w for w in set(want) | set(got) if want.get(w) != got.get(w))[:5]
            raise AnswerMismatch(
                f"lookup {first + number} ({len(lookups[number])} blocks): {name} and "
                f"{ref_name} disagree on workers {differ}: {name} "
                f"{ {w: got.get(w, 0) for w in differ} }, {ref_name} "
                f"{ {w: want.get(w, 0) for w in differ} }"
            )


def bench_grid(
    traces: Sequence[Path | str],
    workers: Sequence[int],
    **options,
) -> dict:
    """bench_index for every trace x worker count, then the block-hash measurement."""
    runs = []
    for trace in traces:
        requests = load_requests(trace)
        for num_workers in workers:
            runs.append(bench_index(trace, workers=num_workers, requests=requests, **options))
    return {"runs": runs, "block_hash": measure_block_hash(repeats=options.get("repeats", 3))}


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

    events = [event for kind, items in ops if kind == "events" for _worker, event in items]
    encoded = {id(event): _dynamo_event(i, event) for i, event in enumerate(events)}
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


@click.command("index")
@click.option(
    "--trace",
    "traces",
    multiple=True,
    help=f"Mooncake JSONL trace with hash_ids, or {CONVERSATION!r} (a multi-turn chat "
    "trace made in code); repeatable [default: the packaged "
    f"kvmesh/bench/traces/mooncake_like.jsonl and {CONVERSATION}].",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    multiple=True,
    help="Simulated workers the requests are routed to; repeatable "
    f"[default: {', '.join(map(str, DEFAULT_WORKERS))}].",
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
    default=None,
    help="Requests outstanding while routing the replay "
    f"[default: {IN_FLIGHT_PER_WORKER} per worker, so every worker gets requests].",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Timed replays per index, taking turns; the best counts.",
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
    traces, workers, capacity_blocks, in_flight, repeats, no_dynamo, json_file
) -> None:
    """KVIndex overlaps() lookups/s and events/s per trace and cluster size, vs a naive
    index and Dynamo's RadixTree."""
    result = bench_grid(
        traces or (default_trace_path(), CONVERSATION),
        workers or DEFAULT_WORKERS,
        capacity_blocks=capacity_blocks,
        in_flight=in_flight,
        repeats=repeats,
        dynamo=not no_dynamo,
    )
    for run in result["runs"]:
        _echo_run(run)
    _echo_table(result["runs"])
    h = result["block_hash"]
    click.echo(
        f"block hash ({h['block_size']}-token blocks, frontends and workers): keyed "
        f"BLAKE2b-128 {h['keyed_blake2b_128_ns']:.0f} ns/block vs XXH3-64 "
        f"{h['xxh3_64_ns']:.0f} ns/block ({h['ratio_vs_xxh3_64']:.2f}x); the index "
        "keys 64-bit wire hashes either way"
    )
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2))


def _echo_run(result: dict) -> None:
    click.echo(
        f"trace {result['trace']}: {result['requests']} requests, {result['blocks']} "
        f"blocks ({result['unique_blocks']} distinct); {result['workers']} workers x "
        f"{result['capacity_blocks']} blocks ({result['workers_used']} used); "
        f"{result['events']} events; hit rate {result['hit_rate']:.1%}"
    )
    for name in INDEX_NAMES:
        r = result[name]
        if r is None:
            click.echo(f"  {name:7s} n/a: {result['dynamo_unavailable']}")
            continue
        click.echo(
            f"  {name:7s} {r['lookups_per_s']:10,.0f} lookups/s "
            f"({r['lookup_us_mean']:7.2f} us)  {r['events_per_s']:10,.0f} events/s  "
            f"{r['event_blocks_per_s']:12,.0f} blocks/s"
        )
    ratios = [
        f"kvmesh vs {name} {result[f'ratio_vs_{name}']:.2f}x"
        for name in ("naive", "dynamo")
        if result[f"ratio_vs_{name}"] is not None
    ]
    click.echo("  lookups/s ratio: " + ", ".join(ratios))
    choose = result["kvmesh_choose"]
    click.echo(
        f"  kvmesh Router.choose (kv, {result['workers']} decode + "
        f"{max(1, result['workers'] // 2)} prefill workers): "
        f"{choose['choices_per_s']:10,.0f} choices/s ({choose['choose_us_mean']:7.2f} us)"
    )


def _echo_table(runs: list[dict]) -> None:
    """One line per trace x workers: lookups/s of each index and kvmesh's ratios."""
    click.echo(
        f"{'trace':24s} {'workers':>7s} {'kvmesh':>10s} {'naive':>10s} {'dynamo':>10s} "
        f"{'vs naive':>8s} {'vs dynamo':>9s}   lookups/s (all answers agree)"
    )
    for run in runs:
        cells = [
            f"{run[name]['lookups_per_s']:10,.0f}" if run[name] else f"{'n/a':>10s}"
            for name in INDEX_NAMES
        ]
        ratios = [
            f"{run[key]:{width}.2f}x" if run[key] is not None else f"{'n/a':>{width + 1}s}"
            for key, width in (("ratio_vs_naive", 7), ("ratio_vs_dynamo", 8))
        ]
        click.echo(
            f"{Path(run['trace']).name:24s} {run['workers']:7d} {' '.join(cells)} "
            f"{' '.join(ratios)}"
        )
