"""Priority levels: admission in (priority, arrival) order, preemption of the lowest
priority, outputs unchanged; the real engine on the tiny model, order from step() outputs."""

import msgspec
import pytest

from kvmesh import Engine, SamplingParams
from kvmesh.engine.scheduler import WaitingQueue
from kvmesh.engine.sequence import Sequence
from kvmesh.params import MAX_PRIORITY, first_token_params
from tests.prompts import random_prompt

PROMPT_LEN = 16  # one block: the block size the engine defaults to


def make_engine(tiny_model_dir, **kwargs) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, **{"num_blocks": 64} | kwargs)


def greedy(priority: int = 0, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, priority=priority
    )


def make_seq(name: str, priority: int) -> Sequence:
    return Sequence(name, [1, 2, 3], SamplingParams(priority=priority))


def first_token_order(engine: Engine) -> list[str]:
    """Request ids in the order their first token came out of engine.step()."""
    order = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and out.request_id not in order:
                order.append(out.request_id)
    return order


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict[str, list[int]]:
    """Greedy outputs of prompts a..e without priorities, nothing queued."""
    engine = make_engine(tiny_model_dir)
    names = "abcde"
    outs = engine.generate(
        [random_prompt(PROMPT_LEN, seed) for seed in range(len(names))], greedy()
    )
    return {name: out.token_ids for name, out in zip(names, outs, strict=True)}


# --- admission order ---


@pytest.mark.parametrize(
    ("priorities", "expected"),
    [
        ({"a": 0, "b": 0, "c": 0}, ["a", "b", "c"]),  # equal: first come first served
        ({"a": 5, "b": 5, "c": 0}, ["c", "a", "b"]),  # c came last but is served first
        ({"a": 1, "b": -1, "c": 0}, ["b", "c", "a"]),
        ({"a": 2, "b": 1, "c": 2, "d": 1}, ["b", "d", "a", "c"]),  # FCFS within a level
    ],
)
def test_queued_requests_are_admitted_by_priority_then_arrival(
    tiny_model_dir, reference, priorities, expected
):
    engine = make_engine(tiny_model_dir, max_num_seqs=1)
    for seed, (name, priority) in enumerate(priorities.items()):
        engine.add_request(random_prompt(PROMPT_LEN, seed), greedy(priority), request_id=name)
    assert first_token_order(engine) == expected


def test_high_priority_arriving_later_overtakes_the_queue_not_the_running(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_seqs=1)
    engine.add_request(random_prompt(PROMPT_LEN, 0), greedy(3), request_id="a")
    assert [out.request_id for out in engine.step()] == ["a"]  # a runs
    engine.add_request(random_prompt(PROMPT_LEN, 1), greedy(3), request_id="b")
    engine.add_request(random_prompt(PROMPT_LEN, 2), greedy(3), request_id="c")
    engine.add_request(random_prompt(PROMPT_LEN, 3), greedy(-3), request_id="d")
    assert engine.scheduler.waiting_ids() == ["d", "b", "c"]
    assert first_token_order(engine) == ["a", "d", "b", "c"]  # a had its first already
    assert engine.num_preemptions == 0  # admission never preempts for priority


def test_token_budget_admits_the_higher_priority_first(tiny_model_dir):
    # a budget of one prompt per step: the step that has room takes the best waiting
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=PROMPT_LEN)
    for seed, (name, priority) in enumerate({"a": 1, "b": 1, "c": 0}.items()):
        engine.add_request(random_prompt(PROMPT_LEN, seed), greedy(priority), request_id=name)
    assert first_token_order(engine) == ["c", "a", "b"]


# --- preemption ---


@pytest.mark.parametrize(
    ("priorities", "victim", "waiting"),
    [
        ({"a": 0, "b": 2, "c": 1, "d": 2, "e": 1}, "b", ["e", "b", "d"]),
        ({"a": 2, "b": 0, "c": 1, "d": 2, "e": 1}, "a", ["e", "a", "d"]),
        ({"a": 0, "b": 0, "c": 0, "d": 0, "e": 0}, "c", ["c", "d", "e"]),  # equal: the newest
    ],
)
def test_preemption_takes_the_lowest_priority_and_requeues_it_first_in_its_level(
    tiny_model_dir, reference, priorities, victim, waiting
):
    # 4 blocks: a, b, c run with one block each; their second decode needs a block
    # each and only one is free. d and e come later and wait (max_num_seqs).
    engine = make_engine(tiny_model_dir, num_blocks=4, max_num_seqs=3)
    for seed, (name, priority) in enumerate(priorities.items()):
        engine.add_request(random_prompt(PROMPT_LEN, seed), greedy(priority), request_id=name)
        if name == "c":
            engine.step()  # a, b, c prefilled
    seqs = {name: engine.requests[name].seq for name in priorities}
    engine.step()
    assert engine.num_preemptions == 1 and seqs[victim].num_preemptions == 1
    assert engine.scheduler.waiting_ids() == waiting
    outs = {}
    while engine.has_unfinished():
        outs |= {out.request_id: out.token_ids for out in engine.step() if out.finished}
    assert outs == reference  # recomputed after preemption, outputs unchanged


# --- outputs ---


def test_greedy_outputs_do_not_depend_on_priority(tiny_model_dir, reference):
    engine = make_engine(tiny_model_dir, max_num_seqs=2, max_num_batched_tokens=24)
    names = list(reference)
    params = [greedy(priority) for priority in (3, -2, 0, 3, -MAX_PRIORITY)]
    outs = engine.generate([random_prompt(PROMPT_LEN, seed) for seed in range(len(names))], params)
    assert {name: out.token_ids for name, out in zip(names, outs, strict=True)} == reference


# --- SamplingParams.priority ---


@pytest.mark.parametrize("value", [MAX_PRIORITY + 1, -MAX_PRIORITY - 1, 1.5, "1", True, None])
def test_invalid_priority_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match=r"^priority must be"):
        SamplingParams(priority=value)


def test_priority_travels_on_the_wire_and_to_the_prefill_worker():
    params = SamplingParams(priority=-7, max_tokens=9)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded.priority == -7
    assert first_token_params(params).priority == -7
    assert SamplingParams().priority == 0


# --- the waiting queue ---


def test_waiting_queue_orders_by_priority_then_arrival_and_preempted_first():
    queue = WaitingQueue()
    seqs = {
        name: make_seq(name, priority)
        for name, priority in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 1)]
    }
    for name in "abcd":
        queue.append(seqs[name])
    queue.appendleft(seqs["e"])  # preempted: first of its level, after the better level
    assert [s.request_id for s in queue] == ["b", "d", "e", "a", "c"]
    assert len(queue) == 5 and queue[0] is seqs["b"] and queue[2] is seqs["e"]
    queue.remove(seqs["d"])
    assert seqs["d"] not in queue and seqs["e"] in queue
    assert [queue.popleft().request_id for _ in range(4)] == ["b", "e", "a", "c"]
    assert not queue and queue.priorities == [] and queue.levels == {}
    with pytest.raises(IndexError):
        queue[0]
