"""KVIndex: exact leading-run overlaps per worker and tier for hand-built event sequences,
a property test against a plain reference model, the torch-free rule, and the index
benchmark on a tiny trace."""

import json
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.bench.index_workload import make_conversation_trace
from kvmesh.bench.router_index import (
    AnswerMismatch,
    NaiveIndex,
    bench_index,
    check_answers,
    index_command,
)
from kvmesh.protocol import TIERS, AllBlocksCleared, BlockRemoved, BlockStored, Heartbeat
from kvmesh.router import kv_index
from kvmesh.router.kv_index import KVIndex, Overlap


def stored(*block_hashes: int, tier: str = "device") -> BlockStored:
    return BlockStored(block_hashes=list(block_hashes), tier=tier)


def removed(*block_hashes: int, tier: str = "device") -> BlockRemoved:
    return BlockRemoved(block_hashes=list(block_hashes), tier=tier)


def cleared(tier: str = "device") -> AllBlocksCleared:
    return AllBlocksCleared(tier=tier)


def make_index(*events) -> KVIndex:
    """An index fed (worker id, event) pairs in order."""
    index = KVIndex()
    for worker_id, event in events:
        index.apply(worker_id, event)
    return index


REQUEST = [11, 12, 13, 14, 15, 16]


@pytest.mark.parametrize(
    "events, expected",
    [
        ([], {}),
        ([("a", stored(11, 12, 13))], {"a": Overlap(3, 0, 0)}),
        ([("a", stored(*REQUEST, 17, 18))], {"a": Overlap(6, 0, 0)}),
        ([("a", stored(12, 13, 14))], {}),  # later blocks without the first: no run
        (
            [("a", stored(11, 12, 13)), ("b", stored(11))],
            {"a": Overlap(3, 0, 0), "b": Overlap(1, 0, 0)},
        ),
        # a removed middle block cuts the run even though later blocks are held
        ([("a", stored(11, 12, 13, 14)), ("a", removed(12))], {"a": Overlap(1, 0, 0)}),
        (
            [
                ("a", stored(11, 12)),
                ("a", stored(13, 14, tier="host")),
                ("a", stored(15, tier="disk")),
            ],
            {"a": Overlap(2, 2, 1)},
        ),
        # the object tier is the slowest: counted where no faster tier holds the block
        (
            [
                ("a", stored(11, 12, 13, tier="object")),
                ("a", stored(12, tier="disk")),
                ("b", stored(11, 12, tier="object")),
            ],
            {"a": Overlap(0, 0, 1, 2), "b": Overlap(0, 0, 0, 2)},
        ),
        # a gap on device filled by host keeps the run going
        ([("a", stored(11, 13)), ("a", stored(12, tier="host"))], {"a": Overlap(2, 1, 0)}),
        # held on device and host: counted once, at device
        ([("a", stored(11, 12, tier="host")), ("a", stored(11))], {"a": Overlap(1, 1, 0)}),
        # removed from device, the host copy stays
        (
            [("a", stored(11, 12)), ("a", stored(11, 12, tier="host")), ("a", removed(11, 12))],
            {"a": Overlap(0, 2, 0)},
        ),
        (
            [("a", stored(11, 12)), ("a", stored(13, tier="host")), ("a", cleared("host"))],
            {"a": Overlap(2, 0, 0)},
        ),
        ([("a", stored(11, 12)), ("a", stored(13, tier="host")), ("a", cleared("device"))], {}),
        # removing what the worker never stored, or another worker's block, is a no-op
        (
            [("a", stored(11, 12)), ("a", removed(99)), ("b", removed(11)), ("b", cleared())],
            {"a": Overlap(2, 0, 0)},
        ),
        ([("a", stored(11, 12)), ("a", stored(11, 12))], {"a": Overlap(2, 0, 0)}),
        # runs of several workers ending at different blocks, on different tiers
        (
            [
                ("a", stored(*REQUEST)),
                ("b", stored(11, 12, 13, tier="host")),
                ("c", stored(11, 13, 14)),
                ("d", stored(11, 12, tier="disk")),
                ("d", stored(13)),
            ],
            {
                "a": Overlap(6, 0, 0),
                "b": Overlap(0, 3, 0),
                "c": Overlap(1, 0, 0),
                "d": Overlap(1, 0, 2),
            },
        ),
    ],
)
def test_overlaps_exact(events, expected):
    assert make_index(*events).overlaps(REQUEST) == expected


def test_overlap_num_blocks_sums_the_tiers():
    assert Overlap(2, 3, 4).num_blocks == 9


def test_empty_request_matches_nothing():
    assert make_index(("a", stored(11))).overlaps([]) == {}


def test_remove_worker_forgets_only_that_worker_and_frees_its_slot():
    index = make_index(
        ("a", stored(11, 12, 13)), ("b", stored(11, 12)), ("a", stored(14, tier="host"))
    )
    index.remove_worker("a")
    assert index.overlaps(REQUEST) == {"b": Overlap(2, 0, 0)}
    assert index.workers == ["b"]
    assert len(index) == 2
    index.apply("c", stored(11))  # takes a's old slot: none of a's blocks may show up
    assert index.overlaps(REQUEST) == {"b": Overlap(2, 0, 0), "c": Overlap(1, 0, 0)}
    index.remove_worker("a")  # unknown now: a no-op
    index.remove_worker("b")
    index.remove_worker("c")
    assert len(index) == 0
    assert index.overlaps(REQUEST) == {}


def test_num_blocks_per_tier_and_len():
    index = make_index(("a", stored(11, 12)), ("a", stored(12, 13, tier="host")), ("b", stored(11)))
    assert [index.num_blocks("a", tier) for tier in TIERS] == [2, 2, 0, 0]
    assert index.num_blocks("a") == 3
    assert index.num_blocks("nobody") == 0
    assert len(index) == 3


def test_removal_from_an_unknown_worker_takes_no_slot():
    index = make_index(("ghost", removed(11)), ("ghost", cleared("disk")))
    assert index.workers == []


@pytest.mark.parametrize("event", [stored(11, tier="gpu"), removed(11, tier="gpu"), cleared("gpu")])
def test_unknown_tier_is_a_clear_error(event):
    index = KVIndex()
    with pytest.raises(
        ValueError, match="tier must be one of device, host, disk, object, got 'gpu'"
    ):
        index.apply("a", event)
    assert index.workers == []


def test_a_message_that_is_no_kv_event_is_rejected():
    with pytest.raises(TypeError, match="not a KV event: Heartbeat"):
        KVIndex().apply("a", Heartbeat())


class CountingList(list):
    """A request whose iteration counts how many hashes were read."""

    num_read = 0

    def __iter__(self):
        for item in super().__iter__():
            self.num_read += 1
            yield item


def test_the_walk_stops_where_no_worker_holds_the_block():
    index = make_index(("a", stored(11, 12)), ("b", stored(11, 12, 13)))
    request = CountingList([11, 12, 13, 14, 15, 16, 17, 18])
    assert index.overlaps(request) == {"a": Overlap(2, 0, 0), "b": Overlap(3, 0, 0)}
    assert request.num_read == 4


# --- property: KVIndex answers what a plain per-worker, per-tier model answers ---

WORKERS = ("a", "b", "c")
HASHES = st.lists(st.integers(1, 6), max_size=6)
EVENTS = st.one_of(
    st.builds(lambda h, t: stored(*h, tier=t), HASHES, st.sampled_from(TIERS)),
    st.builds(lambda h, t: removed(*h, tier=t), HASHES, st.sampled_from(TIERS)),
    st.builds(cleared, st.sampled_from(TIERS)),
    st.none(),  # remove_worker
)


def reference_overlaps(held: dict, request: list[int]) -> dict:
    """held[worker][tier] = set of hashes; each worker's leading run, fastest tier first."""
    result = {}
    for worker_id, tiers in held.items():
        counts = [0] * len(TIERS)
        for block_hash in request:
            holding = [i for i, tier in enumerate(TIERS) if block_hash in tiers[tier]]
            if not holding:
                break
            counts[holding[0]] += 1
        if any(counts):
            result[worker_id] = Overlap(*counts)
    return result


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(WORKERS), EVENTS), max_size=25),
    requests=st.lists(st.lists(st.integers(1, 7), max_size=8), min_size=1, max_size=4),
)
def test_overlaps_match_a_reference_model(ops, requests):
    index = KVIndex()
    held: dict = {}
    for worker_id, event in ops:
        if event is None:
            index.remove_worker(worker_id)
            held.pop(worker_id, None)
            continue
        index.apply(worker_id, event)
        tiers = held.setdefault(worker_id, {tier: set() for tier in TIERS})
        if isinstance(event, BlockStored):
            tiers[event.tier].update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            tiers[event.tier].difference_update(event.block_hashes)
        else:
            tiers[event.tier].clear()
    for request in requests:
        assert index.overlaps(request) == reference_overlaps(held, request)
    assert len(index) == len(set().union(*(s for t in held.values() for s in t.values())))


# --- property: KVIndex answers what the benchmark's NaiveIndex answers ---


def random_stream(rng: random.Random, num_workers: int, num_ops: int, num_hashes: int):
    """(worker, event or None for remove_worker, request) triples: prefix-shaped stores
    (runs of consecutive hashes from a random start, as chained prefixes are), random
    removals and clears, on all tiers."""
    for _ in range(num_ops):
        worker = f"w{rng.randrange(num_workers)}"
        tier = rng.choice(TIERS)
        kind = rng.random()
        start = rng.randrange(num_hashes)
        run = list(range(start, min(num_hashes, start + rng.randrange(1, 12))))
        if kind < 0.6:
            event = stored(*run, tier=tier)
        elif kind < 0.9:
            event = removed(*rng.sample(range(num_hashes), rng.randrange(1, 6)), tier=tier)
        elif kind < 0.97:
            event = cleared(tier)
        else:
            event = None
        first = rng.randrange(num_hashes // 4)
        yield worker, event, list(range(first, first + rng.randrange(0, 20)))


@pytest.mark.parametrize("num_workers, num_ops", [(1, 3000), (8, 3000), (64, 2000), (1000, 800)])
def test_overlaps_match_the_naive_index_on_random_streams(num_workers, num_ops):
    rng = random.Random(num_workers)
    index, naive = KVIndex(), NaiveIndex()
    lookups = 0
    for worker, event, request in random_stream(rng, num_workers, num_ops, 60):
        if event is None:
            index.remove_worker(worker)
            naive.blocks.pop(worker, None)
        else:
            index.apply(worker, event)
            naive.apply(worker, event)
        answer = index.overlaps(request)
        assert answer == naive.overlaps(request), (worker, event, request)
        lookups += bool(answer)
    off_device = {h for blocks in naive.blocks.values() for h, mask in blocks.items() if mask > 1}
    assert index._num_off_device == len(off_device)  # picks the tier-aware walk or not
    assert lookups > num_ops // 3  # many lookups matched some worker: the test has teeth


def test_unused_holder_values_are_forgotten_and_answers_stay_exact(monkeypatch):
    monkeypatch.setattr(kv_index, "CANONICAL_MIN", 8)
    rng = random.Random(5)
    index, naive = KVIndex(), NaiveIndex()
    most = 0
    for worker, event, request in random_stream(rng, 8, 600, 60):
        if event is None:
            index.remove_worker(worker)
            naive.blocks.pop(worker, None)
        else:
            index.apply(worker, event)
            naive.apply(worker, event)
        assert index.overlaps(request) == naive.overlaps(request)
        live = len(set(index._holders.values()))
        most = max(most, len(index._canonical))
        assert len(index._canonical) <= max(8, 2 * live) + 60  # one event adds <= 60
    assert most > 8  # the limit was reached: values were forgotten at least once


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 70), EVENTS), max_size=40),
    requests=st.lists(st.lists(st.integers(1, 7), max_size=8), min_size=1, max_size=4),
)
def test_overlaps_match_the_naive_index_with_wide_lanes(ops, requests):
    """Worker slots up to 70: holder ints past 200 bits, slots freed and reused."""
    index, naive = KVIndex(), NaiveIndex()
    for worker, event in ops:
        if event is None:
            index.remove_worker(worker)
            naive.blocks.pop(worker, None)
        else:
            index.apply(worker, event)
            naive.apply(worker, event)
        for request in requests:
            assert index.overlaps(request) == naive.overlaps(request)


# --- torch-free, and the benchmark on a tiny trace ---


def test_router_modules_do_not_import_torch():
    code = (
        "import sys, kvmesh.router.kv_index, kvmesh.router.policy, "
        "kvmesh.bench.router_index; assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def write_trace(path, requests: list[list[int]]):
    lines = [
        json.dumps(
            {"timestamp": i, "input_length": 512 * len(ids), "output_length": 1, "hash_ids": ids}
        )
        for i, ids in enumerate(requests)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


TINY_TRACE = [[0, 1, 2], [0, 1, 3], [4, 5], [0, 1, 2, 6], [4, 7], [0, 8], [9], [0, 1, 2, 6, 10]]


def test_bench_index_answers_agree_with_the_naive_index(tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl", TINY_TRACE)
    result = bench_index(
        trace, workers=2, capacity_blocks=4, in_flight=2, repeats=2, dynamo=False, lookup_batch=1
    )
    assert result["requests"] == 8
    assert result["blocks"] == 22
    assert result["unique_blocks"] == 11
    assert result["workers_used"] == 2
    assert result["hit_blocks"] > 0
    assert result["dynamo"] is None
    assert result["dynamo_unavailable"] == "disabled (--no-dynamo)"
    assert result["ratio_vs_naive"] > 0
    assert result["ratio_vs_dynamo"] is None


def test_bench_index_agrees_with_dynamo_when_installed(tmp_path):
    pytest.importorskip("dynamo.llm")
    trace = write_trace(tmp_path / "trace.jsonl", TINY_TRACE)
    result = bench_index(
        trace, workers=3, capacity_blocks=4, in_flight=2, repeats=1, lookup_batch=1
    )
    assert result["dynamo"]["lookups_per_s"] > 0
    assert result["ratio_vs_dynamo"] > 0


def test_a_disagreeing_index_fails_the_benchmark_naming_the_lookup():
    lookups = [[1, 2], [1, 2, 3]]
    kvmesh = [{}, {"w0": 2, "w1": 1}]
    naive = [{}, {"w0": 3, "w1": 1}]
    check_answers(("kvmesh", kvmesh), ("naive", kvmesh), lookups, 40)  # equal: no error
    with pytest.raises(AnswerMismatch) as error:
        check_answers(("kvmesh", kvmesh), ("naive", naive), lookups, 40)
    assert error.value.message == (
        "lookup 41 (3 blocks): naive and kvmesh disagree on workers ['w0']: "
        "naive {'w0': 3}, kvmesh {'w0': 2}"
    )


def test_bench_index_fails_when_an_index_answers_wrong(tmp_path, monkeypatch):
    trace = write_trace(tmp_path / "trace.jsonl", TINY_TRACE)
    monkeypatch.setattr(NaiveIndex, "overlaps", lambda self, hashes: {})  # never a hit
    with pytest.raises(AnswerMismatch, match=r"^lookup \d+ \(\d+ blocks\): naive and kvmesh"):
        bench_index(
            trace,
            workers=2,
            capacity_blocks=4,
            in_flight=2,
            repeats=1,
            dynamo=False,
            lookup_batch=1,
        )


def test_bench_index_command_runs_the_grid_and_writes_json(tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl", TINY_TRACE)
    out = tmp_path / "index.json"
    args = ["--trace", str(trace), "--workers", "2", "--workers", "3", "--repeats", "1"]
    run = CliRunner().invoke(index_command, [*args, "--no-dynamo", "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "trace.jsonl                    2" in run.output
    assert "trace.jsonl                    3" in run.output
    assert "block hash (16-token blocks, frontends and workers): keyed BLAKE2b-128" in run.output
    result = json.loads(out.read_text())
    assert [(r["requests"], r["workers"], r["in_flight"]) for r in result["runs"]] == [
        (8, 2, 4),
        (8, 3, 6),
    ]
    assert result["block_hash"]["keyed_blake2b_128_ns"] > 0 < result["block_hash"]["xxh3_64_ns"]


def test_bench_index_command_names_a_missing_trace(tmp_path):
    run = CliRunner().invoke(index_command, ["--trace", str(tmp_path / "nope.jsonl")])
    assert run.exit_code != 0
    assert "trace not found" in run.output
    assert "--trace conversation" in run.output


# --- the multi-turn conversation trace ---


def test_conversation_turns_resend_the_history_but_its_last_block():
    requests = make_conversation_trace(2000, concurrent=8, system_prompts=3, seed=1)
    assert len(requests) == 2000
    firsts = {r[0] for r in requests}
    assert len(firsts) == 3  # every request opens with one of the shared system prompts
    parent: dict = {}
    for request in requests:  # chained ids: an id always follows the same id
        for before, block in zip((None, *request), request, strict=False):
            assert parent.setdefault(block, before) == before, (block, before)
    extends = sum(
        any(
            later[: len(r) - 1] == r[:-1] and len(later) > len(r) - 1
            for later in requests[i + 1 :][:40]
        )
        for i, r in enumerate(requests[:200])
    )
    assert extends > 150  # most turns come back as a longer prompt sharing all but one block
    assert make_conversation_trace(50, seed=1) == make_conversation_trace(50, seed=1)
