"""Admission (kvmesh.frontend.admission): one model's slots and queue. Order by
(priority, arrival), max_queue and queue_timeout refusals with Retry-After, clients that
leave while queued, a random hammer of cancels, independent models, the /metrics view,
and a refusal through the real HTTP server as the official openai client sees it."""

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvmesh.frontend.admission import (
    Admission,
    AdmissionCollector,
    AdmissionPolicy,
    AdmissionRefused,
)
from kvmesh.frontend.app import create_app
from kvmesh.frontend.backend import OverloadedError
from kvmesh.tokenizer import Tokenizer
from tests.frontend import StubBackend, running_server
from tests.polling import wait_until


def make_admission(model: str = "m", **policy) -> Admission:
    return Admission(AdmissionPolicy(**{"max_inflight": 1, "max_queue": 8, **policy}), model)


async def until_queued(admission: Admission, num_queued: int) -> None:
    """Yield to the event loop until `num_queued` requests wait (new tasks reach their await)."""
    for _ in range(1000):
        if admission.num_queued == num_queued:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{admission.num_queued} requests queued, never {num_queued}")


async def queue_up(admission: Admission, priorities, served: list) -> list[asyncio.Task]:
    """One task per priority, queued in this order; each appends its index to `served`
    when admitted and releases at once."""

    async def request(index: int, priority: int | None) -> None:
        async with admission.slot(priority):
            served.append(index)

    tasks, queued = [], admission.num_queued
    for index, priority in enumerate(priorities):
        tasks.append(asyncio.create_task(request(index, priority)))
        await until_queued(admission, queued + len(tasks))
    return tasks


@pytest.mark.parametrize(
    ("default_priority", "priorities", "order"),
    [
        (0, [0, 0, 0, 0], [0, 1, 2, 3]),  # one level: first come first served
        (0, [2, 0, 1, 0, 2, -1], [5, 1, 3, 2, 0, 4]),  # lower value first, FIFO within
        (5, [5, None, 4, 6, None], [2, 0, 1, 4, 3]),  # None is default_priority
    ],
)
def test_waiters_are_admitted_by_priority_then_arrival(default_priority, priorities, order):
    async def scenario():
        admission = make_admission(default_priority=default_priority)
        held = await admission.acquire()
        served = []
        tasks = await queue_up(admission, priorities, served)
        assert served == []
        held.release()
        await asyncio.gather(*tasks)
        return served, admission.stats()

    served, stats = asyncio.run(scenario())
    assert served == order
    assert (stats.num_inflight, stats.num_queued) == (0, 0)
    assert stats.admitted_total == len(priorities) + 1


@pytest.mark.parametrize(("max_queue", "retry_after"), [(0, 1.0), (3, 4.0)])
def test_a_full_queue_refuses_with_a_retry_after_from_the_queue_ahead(max_queue, retry_after):
    async def scenario():
        admission = make_admission(max_queue=max_queue)
        held = await admission.acquire()
        tasks = await queue_up(admission, [0] * max_queue, [])
        with pytest.raises(AdmissionRefused) as refused:
            await admission.acquire(-5)  # a better priority does not jump a full queue
        stats = admission.stats()
        held.release()
        await asyncio.gather(*tasks)
        return refused.value, stats

    error, stats = asyncio.run(scenario())
    assert isinstance(error, OverloadedError)  # the HTTP layer's 429
    assert error.code == "queue_full"
    assert error.retry_after == retry_after  # (queued + 1) x 1 s (first guess) / 1 slot
    assert str(error) == (
        f"model 'm' is full: 1 requests in flight and {max_queue} queued (max_inflight 1, "
        f"max_queue {max_queue}); try again shortly"
    )
    assert stats.refused_total == {"queue_full": 1, "queue_timeout": 0}
    assert (stats.num_inflight, stats.num_queued) == (1, max_queue)


@pytest.mark.parametrize(
    ("service_time", "num_queued", "max_inflight", "retry_after"),
    [(1.0, 0, 4, 1.0), (2.5, 3, 2, 5.0), (10.0, 99, 1, 60.0)],
)
def test_retry_after_is_the_drain_time_of_the_queue_within_bounds(
    service_time, num_queued, max_inflight, retry_after
):
    admission = make_admission(max_inflight=max_inflight)
    admission.service_time, admission.num_queued = service_time, num_queued
    assert admission.retry_after() == retry_after


def test_service_time_is_a_moving_average_of_released_slots():
    async def scenario():
        admission = make_admission()
        await admission.acquire()
        admission.on_release(11.0)
        return admission

    admission = asyncio.run(scenario())
    assert admission.service_time == 2.0  # 1 + 0.1 x (11 - 1)
    assert admission.num_inflight == 0


def test_a_waiter_past_queue_timeout_is_refused_and_the_next_one_keeps_its_turn():
    async def scenario():
        admission = make_admission(queue_timeout=0.05)
        held = await admission.acquire()
        with pytest.raises(AdmissionRefused) as refused:
            await admission.acquire()
        after_timeout = admission.stats()
        served = []
        tasks = await queue_up(admission, [0, 0], served)
        held.release()
        await asyncio.gather(*tasks)
        return refused.value, after_timeout, served, admission.stats()

    error, after_timeout, served, stats = asyncio.run(scenario())
    assert error.code == "queue_timeout"
    assert error.retry_after == 1.0
    assert str(error) == (
        "model 'm': the request waited 0.05 s in the queue (queue_timeout) without a slot; "
        "try again later"
    )
    assert (after_timeout.num_inflight, after_timeout.num_queued) == (1, 0)
    assert after_timeout.refused_total == {"queue_full": 0, "queue_timeout": 1}
    assert served == [0, 1]
    assert (stats.num_inflight, stats.admitted_total) == (0, 3)


def test_a_release_and_an_expiry_in_the_same_tick_admit_the_waiter_once():
    async def scenario():
        admission = make_admission(queue_timeout=0.01)
        held = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await until_queued(admission, 1)
        time.sleep(0.02)  # block the loop: the expiry is due when it next looks...
        asyncio.get_running_loop().call_soon(held.release)  # ...just after this release
        ticket = await waiter
        stats = admission.stats()
        ticket.release()
        return stats

    stats = asyncio.run(scenario())
    assert stats.refused_total == {"queue_full": 0, "queue_timeout": 0}
    assert (stats.num_inflight, stats.num_queued, stats.admitted_total) == (1, 0, 2)


def test_an_admitted_request_holds_its_slot_past_queue_timeout():
    async def scenario():
        admission = make_admission(queue_timeout=0.01)
        held = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await until_queued(admission, 1)
        held.release()
        ticket = await waiter
        await asyncio.sleep(0.05)  # past the queue timeout: its timer was cancelled
        stats = admission.stats()
        ticket.release()
        return stats, admission.stats()

    holding, released = asyncio.run(scenario())
    assert holding.num_inflight == 1
    assert holding.refused_total == {"queue_full": 0, "queue_timeout": 0}
    assert released.num_inflight == 0


def test_a_client_leaving_the_queue_takes_no_slot():
    async def scenario():
        admission = make_admission()
        held = await admission.acquire()
        staying = await queue_up(admission, [0], [])
        leaving = asyncio.create_task(admission.acquire())
        await until_queued(admission, 2)
        staying += await queue_up(admission, [0], [])
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        after_cancel = admission.stats()
        held.release()
        await asyncio.gather(*staying)
        return after_cancel, admission.stats()

    after_cancel, stats = asyncio.run(scenario())
    assert (after_cancel.num_inflight, after_cancel.num_queued) == (1, 2)
    assert after_cancel.cancelled_total == 1
    assert (stats.num_inflight, stats.num_queued, stats.admitted_total) == (0, 0, 3)


@pytest.mark.parametrize("next_waiter", [True, False])
def test_a_slot_handed_to_a_client_that_leaves_in_the_same_tick_passes_on(next_waiter):
    async def scenario():
        admission = make_admission()
        held = await admission.acquire()
        leaving = asyncio.create_task(admission.acquire())
        await until_queued(admission, 1)
        served = []
        staying = await queue_up(admission, [0], served) if next_waiter else []
        held.release()  # hands the slot to `leaving`, which has not resumed yet...
        leaving.cancel()  # ...when its client goes
        results = await asyncio.gather(leaving, *staying, return_exceptions=True)
        return results[0], served, admission.stats()

    result, served, stats = asyncio.run(scenario())
    assert isinstance(result, asyncio.CancelledError)
    assert served == ([0] if next_waiter else [])
    assert (stats.num_inflight, stats.num_queued) == (0, 0)
    assert stats.cancelled_total == 0  # it left holding a slot, not waiting


@pytest.mark.parametrize("queue_timeout", [30.0, 0.002])
def test_random_cancels_never_leak_or_duplicate_a_slot(queue_timeout):
    max_inflight = 3
    rng = random.Random(16)

    async def scenario():
        admission = make_admission(
            max_inflight=max_inflight, max_queue=20, queue_timeout=queue_timeout
        )
        holders, most = set(), 0

        async def request(index: int) -> None:
            nonlocal most
            async with admission.slot(rng.randint(-2, 2)):
                holders.add(index)
                most = max(most, len(holders))
                try:
                    for _ in range(rng.randint(0, 5)):
                        await asyncio.sleep(0 if rng.random() < 0.8 else 0.001)
                finally:
                    holders.discard(index)

        tasks = []
        for index in range(600):
            tasks.append(asyncio.create_task(request(index)))
            if rng.random() < 0.5:
                await asyncio.sleep(0)
            if rng.random() < 0.3:
                rng.choice(tasks).cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        drained = admission.stats()
        tickets = [await admission.acquire() for _ in range(max_inflight)]
        return results, drained, most, tickets, admission

    results, drained, most, tickets, admission = asyncio.run(scenario())
    outcomes = {type(r).__name__ for r in results}
    assert outcomes <= {"NoneType", "CancelledError", "AdmissionRefused"}
    assert "CancelledError" in outcomes
    assert most == max_inflight  # full at times, never over
    assert (drained.num_inflight, drained.num_queued) == (0, 0)
    assert admission._levels == {} and admission._priorities == []
    assert [t.waited for t in tickets] == [0.0] * max_inflight  # every slot free again
    assert admission.num_inflight == max_inflight


def test_one_models_full_queue_never_delays_another_models_request():
    async def scenario():
        busy, idle = make_admission("busy", max_queue=2), make_admission("idle")
        held = await busy.acquire()
        waiting = await queue_up(busy, [0, 0], [])
        with pytest.raises(AdmissionRefused):
            await busy.acquire()
        async with idle.slot() as ticket:
            waited = ticket.waited
            during = busy.stats(), idle.stats()
        after = busy.stats()  # idle's release admitted none of busy's waiters
        held.release()
        await asyncio.gather(*waiting)
        return waited, during, after

    waited, (busy, idle), after = asyncio.run(scenario())
    assert waited == 0.0
    assert (idle.num_inflight, idle.num_queued, idle.refused_total["queue_full"]) == (1, 0, 0)
    assert (busy.num_inflight, busy.num_queued, busy.refused_total["queue_full"]) == (1, 2, 1)
    assert (after.num_inflight, after.num_queued) == (1, 2)


def test_leaving_an_async_generator_early_releases_its_slot():
    async def scenario():
        admission = make_admission()

        async def stream():
            async with admission.slot():
                yield 1
                yield 2

        tokens = stream()
        assert await anext(tokens) == 1
        holding = admission.num_inflight
        await tokens.aclose()  # the client went away mid-stream
        return holding, admission.num_inflight

    assert asyncio.run(scenario()) == (1, 0)


def test_the_collector_serves_every_models_admission():
    async def scenario():
        first, second = make_admission("a", max_queue=0), make_admission("b")
        await first.acquire()
        with pytest.raises(AdmissionRefused):
            await first.acquire()
        return first, second

    admissions = asyncio.run(scenario())
    registry = CollectorRegistry()
    registry.register(AdmissionCollector(lambda: admissions))
    lines = set(generate_latest(registry).decode().splitlines())
    expected = {
        'kvmesh_admission_inflight{model="a"} 1.0',
        'kvmesh_admission_inflight{model="b"} 0.0',
        'kvmesh_admission_queued{model="a"} 0.0',
        'kvmesh_admission_admitted_total{model="a"} 1.0',
        'kvmesh_admission_cancelled_total{model="a"} 0.0',
        'kvmesh_admission_refused_total{code="queue_full",model="a"} 1.0',
        'kvmesh_admission_refused_total{code="queue_timeout",model="a"} 0.0',
        'kvmesh_admission_queue_wait_seconds_bucket{le="0.001",model="a"} 1.0',
        'kvmesh_admission_queue_wait_seconds_bucket{le="+Inf",model="b"} 0.0',
        'kvmesh_admission_queue_wait_seconds_count{model="a"} 1.0',
        'kvmesh_admission_queue_wait_seconds_sum{model="a"} 0.0',
        "# TYPE kvmesh_admission_queue_wait_seconds histogram",
    }
    assert expected - lines == set()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_inflight", 0, "max_inflight must be >= 1, got 0"),
        ("max_inflight", 2.5, "max_inflight must be an integer, got 2.5"),
        ("max_queue", -1, "max_queue must be >= 0, got -1"),
        ("queue_timeout", 0, "queue_timeout must be seconds > 0, got 0"),
        ("queue_timeout", float("inf"), "queue_timeout must be seconds > 0, got inf"),
        ("queue_timeout", "5", "queue_timeout must be a number, got '5'"),
        ("default_priority", 1001, "default_priority must be <= 1000, got 1001"),
    ],
)
def test_a_bad_policy_key_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError) as error:
        AdmissionPolicy(**{field: value})
    assert str(error.value) == message


def test_a_priority_outside_the_api_range_is_refused_by_name():
    admission = make_admission()
    with pytest.raises(ValueError) as error:
        asyncio.run(admission.acquire(-1001))
    assert str(error.value) == "priority must be >= -1000, got -1001"
    assert admission.num_inflight == 0


HOLD = 9  # a prompt of [HOLD] holds its slot until its client goes away


class AdmittedBackend(StubBackend):
    """The stub behind one Admission, wired as the frontend wires a model's backend."""

    def __init__(self, tokenizer: Tokenizer, admission: Admission) -> None:
        super().__init__(tokenizer)
        self.admission = admission

    async def generate(self, request_id, prompt_token_ids, params):
        async with self.admission.slot(params.priority):
            async for delta in super().generate(request_id, prompt_token_ids, params):
                yield delta
                if prompt_token_ids == [HOLD]:
                    await asyncio.sleep(3600)


def test_over_http_a_full_queue_is_a_429_with_retry_after_and_a_queued_request_is_served(
    tiny_model_dir,
):
    openai = pytest.importorskip("openai")
    admission = make_admission("stub", max_queue=1)
    backend = AdmittedBackend(Tokenizer.from_pretrained(tiny_model_dir), admission)
    backend.script = ["a", "b"]
    with running_server(create_app(backend)) as url, httpx.Client(base_url=url) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        body = {"model": "stub", "prompt": [HOLD], "max_tokens": 2, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, timeout=60) as holder:
            lines = holder.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")  # it holds the one slot
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(
                    client.completions.create, model="stub", prompt=[5], max_tokens=2
                )
                wait_until(lambda: admission.num_queued == 1, "a request queued")
                with pytest.raises(openai.RateLimitError) as refused:
                    client.completions.create(model="stub", prompt=[5], max_tokens=2)
                assert refused.value.response.headers["retry-after"] == "2"  # 2 x 1 s / 1
                assert refused.value.code == "overloaded"
                assert admission.num_queued == 1
                holder.close()  # its client goes away: its slot passes to the queued one
                assert queued.result(timeout=60).choices[0].text == "ab"
    stats = wait_until(lambda: (s := admission.stats()).num_inflight == 0 and s, "slots freed")
    assert (stats.num_queued, stats.admitted_total, stats.refused_total["queue_full"]) == (0, 2, 1)
