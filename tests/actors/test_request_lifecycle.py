"""The frontend's request lifecycle: place, stream, migrate on a coded worker_died or
refused error (at most max_migrations times), else end with the code's exception. The
migration state is one RequestState; errors are branched on by code, never by words.

The frontend here is real but its router and workers are scripted: placements come
from a list, sends are recorded, and the tests play the workers' TokenBatches, deaths
and refusals into it."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import pytest

from kvmesh.actors.base import ActorConfig, Inbound
from kvmesh.actors.frontend import FrontendActor, FrontendSettings, RequestState
from kvmesh.actors.peers import Route
from kvmesh.frontend.backend import (
    BackendUnavailable,
    LocalBackend,
    exception_of,
)
from kvmesh.frontend.models import ServedModel
from kvmesh.params import SamplingParams
from kvmesh.protocol import (
    ActorStatus,
    ClusterStatus,
    Delta,
    Error,
    ErrorCode,
    Generate,
    Placement,
    RouterLoad,
    StreamError,
    StreamErrorCode,
    TokenBatch,
    WorkerLoad,
)

pytestmark = pytest.mark.timeout(60)

PROMPT = [1, 2, 3]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0)


def make_state(**fields) -> RequestState:
    return RequestState("r-1", PROMPT, PARAMS, **fields)


def make_placement(worker: str) -> Placement:
    return Placement(
        decode=worker,
        decode_endpoint=f"tcp://{worker}",
        prefill="prefill-0",
        prefill_endpoint="tcp://prefill-0",
    )


def token(token_id: int, text: str, finish: str | None = None, cached: int = 0) -> Delta:
    return Delta(
        request_id="r-1",
        new_token_ids=[token_id],
        new_text=text,
        finish_reason=finish,
        num_cached_tokens=cached,
    )


def inbound(peer: str) -> Inbound:
    return Inbound(Route(f"to_{peer}"), peer, [])


class ScriptedFrontend(FrontendActor):
    """A FrontendActor whose router places requests on `workers` in turn and whose
    messages are recorded instead of sent: the lifecycle without sockets."""

    def __init__(self, model_dir, workers: list[str], max_migrations: int = 3) -> None:
        super().__init__(
            ActorConfig(actor_id="frontend-0"),
            FrontendSettings(
                models=(ServedModel("tiny", str(model_dir)),),
                router_endpoint="tcp://127.0.0.1:9",
                max_migrations=max_migrations,
            ),
        )
        self.workers = list(workers)
        self.placed: list[tuple[list[int], list[str]]] = []  # (token ids, excluded)
        self.sent: list[tuple[str, object]] = []

    async def _place(self, state: RequestState) -> Placement:
        self.placed.append((state.token_ids(), list(state.lost_workers)))
        return make_placement(self.workers.pop(0))

    async def ensure_connected(self, peer: str, endpoint: str, timeout: float) -> None:
        pass

    async def send(self, peer: str, msg, **kwargs) -> None:
        self.sent.append((peer, msg))

    def generates(self) -> list[tuple[str, Generate]]:
        return [(peer, msg) for peer, msg in self.sent if isinstance(msg, Generate)]

    async def until_generates(self, n: int) -> None:
        while len(self.generates()) < n:
            await asyncio.sleep(0)

    async def stream_from(self, worker: str, *deltas: Delta) -> None:
        await self.on_token_batch(TokenBatch(deltas=list(deltas)), inbound(worker))


async def collect(frontend: FrontendActor) -> list[Delta]:
    return [delta async for delta in frontend.generate("r-1", PROMPT, PARAMS)]


# --- RequestState ---


def test_advance_records_tokens_and_text_and_keeps_the_first_cached_count():
    state = make_state()
    first = state.advance(token(5, "ab", cached=16))
    later = state.advance(token(6, "c", finish="length", cached=32))  # after a move
    assert (first.num_cached_tokens, later.num_cached_tokens) == (16, 16)
    assert (state.output_token_ids, state.num_sent_chars) == ([5, 6], 3)
    assert state.token_ids() == [*PROMPT, 5, 6]
    assert state.finished


def test_losing_the_requests_worker_wakes_its_stream_with_the_code():
    state = make_state(worker="decode-0")
    state.lose("decode-0", StreamErrorCode.WORKER_DIED, "decode worker decode-0 died")
    assert (state.worker, state.lost_workers) == (None, ["decode-0"])
    assert state.stream.get_nowait().error == StreamError(
        code=StreamErrorCode.WORKER_DIED, message="decode worker decode-0 died"
    )


@pytest.mark.parametrize("worker", [None, "decode-1"])
def test_losing_another_worker_changes_nothing(worker):
    state = make_state(worker=worker)
    state.lose("decode-0", StreamErrorCode.WORKER_DIED, "decode worker decode-0 died")
    assert (state.worker, state.lost_workers, state.stream.qsize()) == (worker, [], 0)


@pytest.mark.parametrize(
    "num_lost, max_migrations, allowed",
    [(0, 0, True), (1, 0, False), (1, 1, True), (3, 3, True), (4, 3, False)],
)
def test_can_move_allows_one_migration_per_lost_worker(num_lost, max_migrations, allowed):
    state = make_state(lost_workers=[f"decode-{i}" for i in range(num_lost)])
    assert state.can_move(max_migrations) is allowed


def test_generate_for_a_first_placement_prefills_remotely_and_a_resumed_one_locally():
    state = make_state()
    first = state.generate_for(make_placement("decode-0"))
    assert (first.prefill, first.output_token_ids, first.num_sent_chars) == ("prefill-0", [], 0)
    state.advance(token(5, "ab"))
    resumed = state.generate_for(make_placement("decode-1"))
    assert (resumed.prefill, resumed.prefill_endpoint) == (None, None)
    assert (resumed.output_token_ids, resumed.num_sent_chars) == ([5], 2)
    assert (resumed.prompt_token_ids, resumed.params) == (PROMPT, PARAMS)


# --- the code's meaning ---


@pytest.mark.parametrize(
    "code, kind, retry_after",
    [
        (StreamErrorCode.INVALID_REQUEST, ValueError, None),
        (StreamErrorCode.REQUEST_ID_IN_USE, ValueError, None),
        (StreamErrorCode.WORKER_DIED, BackendUnavailable, 1.0),
        (StreamErrorCode.REFUSED, BackendUnavailable, 1.0),
        (StreamErrorCode.ABORTED, BackendUnavailable, 1.0),
        (StreamErrorCode.ENGINE_DEAD, BackendUnavailable, None),
        ("from_a_newer_peer", RuntimeError, None),
    ],
)
def test_exception_of_maps_each_code_whatever_its_message_says(code, kind, retry_after):
    error = exception_of(StreamError(code=code, message="unavailable: died: decode-0"))
    assert type(error) is kind
    assert getattr(error, "retry_after", None) == retry_after
    assert "unavailable: died: decode-0" in str(error)


def test_local_backend_ends_a_stream_of_a_dead_engine_with_the_engine_dead_code():
    from kvmesh.engine.async_engine import EngineDeadError

    class DeadEngine:
        config = types.SimpleNamespace(path="/m/tiny", max_model_len=64, vocab_size=100)
        tokenizer = None

        def start(self) -> None:
            pass

        async def generate(self, prompt_token_ids, params, request_id):
            raise EngineDeadError("the engine thread died: boom")
            yield  # an async generator, as AsyncEngine.generate is

    async def scenario():
        backend = LocalBackend(DeadEngine())
        await backend.start()
        return [d async for d in backend.generate("r-1", PROMPT, PARAMS)]

    with pytest.raises(BackendUnavailable, match="boom") as raised:
        asyncio.run(scenario())
    assert raised.value.retry_after is None


# --- the frontend's loop ---


def test_a_dead_workers_request_moves_on_with_what_it_streamed(tiny_model_dir):
    async def scenario():
        frontend = ScriptedFrontend(tiny_model_dir, ["decode-0", "decode-1"])
        task = asyncio.create_task(collect(frontend))
        await frontend.until_generates(1)
        await frontend.stream_from("decode-0", token(5, "a", cached=16), token(6, "bc"))
        await frontend._run_watches("decode-0")  # as when Peers declares it dead
        await frontend.until_generates(2)
        await frontend.stream_from("decode-0", token(66, "x"))  # the lost worker: dropped
        await frontend.stream_from("decode-1", token(7, "d", finish="length"))
        return await task, frontend

    deltas, frontend = asyncio.run(scenario())
    assert [d.new_token_ids for d in deltas] == [[5], [6], [7]]
    assert [d.num_cached_tokens for d in deltas] == [16, 16, 16]
    assert frontend.placed == [(PROMPT, []), ([*PROMPT, 5, 6], ["decode-0"])]
    (first_worker, first), (second_worker, second) = frontend.generates()
    assert (first_worker, first.prefill, first.output_token_ids) == ("decode-0", "prefill-0", [])
    assert (second_worker, second.prefill) == ("decode-1", None)
    assert (second.output_token_ids, second.num_sent_chars) == ([5, 6], 3)
    assert frontend.requests == {}


def test_a_worker_error_worded_like_a_death_is_not_a_death(tiny_model_dir):
    """The old frontend recognised death by the prefix "unavailable: died:" of any error
    text; now only the worker_died code migrates, and this one ends the request."""

    async def scenario():
        frontend = ScriptedFrontend(tiny_model_dir, ["decode-0", "decode-1"])
        task = asyncio.create_task(collect(frontend))
        await frontend.until_generates(1)
        invalid = Delta.failed(
            "r-1", StreamErrorCode.INVALID_REQUEST, "unavailable: died: decode-0 (a stop string)"
        )
        await frontend.stream_from("decode-0", invalid)
        with pytest.raises(ValueError, match="unavailable: died: decode-0") as raised:
            await task
        return raised.value, frontend

    error, frontend = asyncio.run(scenario())
    assert type(error) is ValueError
    assert [worker for worker, _ in frontend.generates()] == ["decode-0"]


def test_a_refusal_then_the_death_of_the_same_worker_is_one_migration(tiny_model_dir):
    async def scenario():
        frontend = ScriptedFrontend(tiny_model_dir, ["decode-0", "decode-1"])
        task = asyncio.create_task(collect(frontend))
        await frontend.until_generates(1)
        refusal = Error(code=ErrorCode.SHUTTING_DOWN, message="draining", request_id="r-1")
        frontend.request_refused(refusal, inbound("decode-0"))
        await frontend._run_watches("decode-0")  # as when Peers declares it dead
        await frontend.until_generates(2)
        await frontend.stream_from("decode-1", token(7, "d", finish="stop"))
        return await task, frontend

    deltas, frontend = asyncio.run(scenario())
    assert [d.new_token_ids for d in deltas] == [[7]]
    assert [worker for worker, _ in frontend.generates()] == ["decode-0", "decode-1"]
    assert frontend.placed[1] == (PROMPT, ["decode-0"])
    assert frontend.metrics().migrations_total == 1


def test_a_request_that_loses_more_workers_than_max_migrations_is_unavailable(tiny_model_dir):
    async def scenario():
        frontend = ScriptedFrontend(tiny_model_dir, ["decode-0", "decode-1"], max_migrations=1)
        task = asyncio.create_task(collect(frontend))
        for n, worker in enumerate(["decode-0", "decode-1"], start=1):
            await frontend.until_generates(n)
            await frontend.stream_from(worker, token(n, "t"))
            await frontend._run_watches(worker)  # as when Peers declares it dead
        with pytest.raises(BackendUnavailable) as raised:
            await task
        return raised.value, frontend

    error, frontend = asyncio.run(scenario())
    assert (str(error), error.retry_after) == ("decode worker decode-1 died", 1.0)
    assert len(frontend.generates()) == 2
    assert frontend.metrics().migrations_total == 1  # the second loss ended it instead


def test_metrics_count_the_routers_workers_and_take_its_own_load(tiny_model_dir):
    frontend = ScriptedFrontend(tiny_model_dir, [])
    model = frontend.models["tiny"]
    model.served = dataclasses.replace(model.served, expected_workers=3)

    def actor(actor_id: str, role: str, load=None) -> ActorStatus:
        return ActorStatus(
            actor_id=actor_id, role=role, node="n", pid=1, endpoints={}, alive=True, load=load
        )

    router_load = RouterLoad(routed_total=2, cached_tokens_total=32, best_cached_tokens_total=48)
    frontend.status = ClusterStatus(
        actors=[
            actor("router-0", "router", router_load),
            actor("decode-0", "decode", WorkerLoad(remote_prefills_total=1)),
            actor("prefill-0", "prefill"),  # registered, no load report yet: alive all the same
            actor("frontend-0", "frontend"),
        ]
    )
    stats = frontend.metrics()
    assert (stats.workers_alive, stats.workers_expected) == (2, 3)
    assert stats.router == router_load
    assert [w.worker for w in stats.workers] == ["decode-0"]
    assert stats.remote_prefill_total == 1
    assert frontend.requests == {}


def test_abort_ends_the_stream_as_unavailable(tiny_model_dir):
    async def scenario():
        frontend = ScriptedFrontend(tiny_model_dir, ["decode-0"])
        task = asyncio.create_task(collect(frontend))
        await frontend.until_generates(1)
        await frontend.abort("r-1")
        with pytest.raises(BackendUnavailable) as raised:
            await task
        return raised.value, frontend

    error, frontend = asyncio.run(scenario())
    assert (str(error), error.retry_after) == ("aborted", 1.0)
    assert frontend.requests == {}
