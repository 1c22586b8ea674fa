"""Scheduler and BlockManager without a model: exact budgets, block ids and queue order."""

import pytest

from kvmesh.engine.block_manager import BlockManager
from kvmesh.engine.scheduler import Scheduler, SchedulerStats
from kvmesh.engine.sequence import Sequence, SequenceStatus
from kvmesh.gpu.block_pool import BlockPool
from kvmesh.params import SamplingParams

BLOCK = 4


def make_seq(name: str, num_tokens: int, first_token: int = 100) -> Sequence:
    return Sequence(name, list(range(first_token, first_token + num_tokens)), SamplingParams())


def make_scheduler(
    num_blocks: int = 16, max_seqs: int = 8, budget: int = 16, pool: BlockPool | None = None
) -> Scheduler:
    pool = BlockPool(num_blocks, BLOCK) if pool is None else pool
    return Scheduler(BlockManager(pool), max_seqs, budget)


def advance(scheduler: Scheduler, batch, new_token: int = 7) -> None:
    """What the engine does after the model ran: report the batch, sample when done."""
    scheduler.update(batch)
    for seq, _ in batch.items:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(new_token)


def scheduled(batch) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in batch.items]


def test_long_prompt_is_chunked_to_the_budget():
    scheduler = make_scheduler(budget=16)
    seq = make_seq("a", 40)
    scheduler.add(seq)
    chunks = []
    while seq.num_computed_tokens < 40:
        batch = scheduler.schedule()
        chunks.append(scheduled(batch))
        advance(scheduler, batch)
    assert chunks == [[("a", 16)], [("a", 16)], [("a", 8)]]
    assert seq.block_table == list(range(10))
    assert scheduled(scheduler.schedule()) == [("a", 1)]  # now decoding


def test_decodes_come_first_and_share_the_budget_with_prefill():
    scheduler = make_scheduler(budget=10)
    a = make_seq("a", 3)
    scheduler.add(a)
    advance(scheduler, scheduler.schedule())  # a prefilled, decoding next
    scheduler.add(make_seq("b", 30))
    batch = scheduler.schedule()
    assert scheduled(batch) == [("a", 1), ("b", 9)]


def test_waiting_queue_is_first_come_first_served():
    # b (large) cannot be admitted yet; c (small) behind it must not jump the queue.
    scheduler = make_scheduler(num_blocks=6, budget=64)
    scheduler.add(make_seq("a", 12))
    advance(scheduler, scheduler.schedule())  # a holds 3 blocks (+1 for its next token)
    scheduler.add(make_seq("b", 12, first_token=500))
    scheduler.add(make_seq("c", 2, first_token=900))
    batch = scheduler.schedule()
    assert scheduled(batch) == [("a", 1)]
    assert scheduler.waiting_ids() == ["b", "c"]


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    scheduler = make_scheduler(num_blocks=4, budget=64)
    a, b = make_seq("a", 8), make_seq("b", 7)
    scheduler.add(a)
    scheduler.add(b)
    advance(scheduler, scheduler.schedule())  # a: 2 blocks full; b: 2 blocks, 8 tokens now
    # a needs a 3rd block for its 9th token: b (newest) is preempted to make room
    batch = scheduler.schedule()
    assert scheduled(batch) == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and scheduler.waiting_ids() == ["b"]
    assert scheduler.stats() == SchedulerStats(
        num_running=1, num_waiting=1, num_remote=0, queued_prefill_tokens=8, num_preemptions=1
    )


def test_sequence_larger_than_the_pool_finishes_with_length():
    pool = BlockPool(2, BLOCK)
    scheduler = make_scheduler(pool=pool, budget=64)
    seq = make_seq("a", 8)
    scheduler.add(seq)
    advance(scheduler, scheduler.schedule())
    batch = scheduler.schedule()
    assert batch.items == [] and batch.finished == [seq]
    assert seq.finish_reason == "length" and pool.num_free_blocks == 2
    assert not scheduler.has_unfinished()


def test_admission_reuses_the_cached_prefix():
    scheduler = make_scheduler(budget=64)
    first = make_seq("a", 10)
    scheduler.add(first)
    advance(scheduler, scheduler.schedule())
    scheduler.finish(first, "stop")
    assert scheduler.stats().num_running == 0
    again = make_seq("b", 10)
    scheduler.add(again)
    batch = scheduler.schedule()
    assert again.num_cached_tokens == 8
    assert again.block_table[:2] == [0, 1]  # the blocks `first` filled and published
    assert scheduled(batch) == [("b", 2)]


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_seqs=2, budget=64)
    for name in "abc":
        scheduler.add(make_seq(name, 2))
    batch = scheduler.schedule()
    assert [s for s, _ in scheduled(batch)] == ["a", "b"]


@pytest.mark.parametrize(("num_tokens", "cached"), [(8, 4), (9, 8), (3, 0)])
def test_prefix_hit_never_covers_the_whole_sequence(num_tokens, cached):
    pool = BlockPool(8, BLOCK)
    manager = BlockManager(pool)
    seq = make_seq("a", num_tokens)
    hashes = seq.full_block_hashes(BLOCK, b"")[:2]
    pool.cache_blocks(pool.allocate(len(hashes)), hashes, None)
    assert len(manager.find_prefix(make_seq("b", num_tokens))) * BLOCK == cached


def test_update_counts_the_batch_computed_and_caches_its_full_blocks():
    pool = BlockPool(16, BLOCK)
    scheduler = make_scheduler(pool=pool, budget=6)
    seq = make_seq("a", 10)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert scheduled(batch) == [("a", 6)] and seq.num_computed_tokens == 0
    scheduler.update(batch)
    assert seq.num_computed_tokens == 6 and seq.num_registered_blocks == 1
    assert pool.match_prefix(seq.full_block_hashes(BLOCK, b"")) == [0]


def test_stats_count_the_queues_and_the_prefill_still_queued():
    scheduler = make_scheduler(max_seqs=1, budget=64)
    for name, n in (("a", 5), ("b", 7), ("c", 3)):
        scheduler.add(make_seq(name, n))
    assert scheduler.stats() == SchedulerStats(0, 3, 0, 15, 0)
    advance(scheduler, scheduler.schedule())  # a runs; b and c wait (max_seqs)
    assert scheduler.stats() == SchedulerStats(1, 2, 0, 10, 0)


def test_finish_leaves_the_running_set_and_frees_unless_held():
    pool = BlockPool(16, BLOCK)
    scheduler = make_scheduler(pool=pool, budget=64)
    free, held = make_seq("a", 6), Sequence("b", [1] * 6, SamplingParams(), hold_blocks=True)
    for seq in (free, held):
        scheduler.add(seq)
    advance(scheduler, scheduler.schedule())
    scheduler.finish(free, "stop")
    scheduler.finish(held, "length")
    assert scheduler.stats().num_running == 0 and not scheduler.has_unfinished()
    assert free.block_table == [] and len(held.block_table) == 2
    assert pool.num_free_blocks == 14
    scheduler.release(held)
    assert held.block_table == [] and pool.num_free_blocks == 16


def test_remote_prefill_parks_until_taken_and_resumed():
    scheduler = make_scheduler(budget=64)
    seq = Sequence("a", list(range(100, 110)), SamplingParams(), remote_prefill=True)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.items == [] and scheduler.is_parked("a")
    assert scheduler.take_new_remote() == [seq] and scheduler.take_new_remote() == []
    assert scheduler.stats().num_remote == 1
    scheduler.resume_remote(seq)
    assert not scheduler.is_parked("a") and seq.num_computed_tokens == 10
    assert scheduler.stats().num_running == 1
