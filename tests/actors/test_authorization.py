"""Who may send what (protocol.SENDERS), and whose a message is: roles checked before a
handler runs, Shutdown from an operator only, events attributed to the connection they
came on; a decode worker takes Abort only from the request's own frontend, and a
frontend takes tokens only from the worker it placed the request on."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from kvmesh.actors.base import Actor, ActorConfig, Inbound, RemoteError
from kvmesh.actors.peers import Route
from kvmesh.protocol import (
    PROTOCOL_VERSION,
    BlockStored,
    ClusterStatus,
    Delta,
    ErrorCode,
    Hello,
    Shutdown,
    StatusQuery,
    StreamError,
    StreamErrorCode,
    TokenBatch,
    encode,
)

pytestmark = pytest.mark.timeout(60)


def make_config(actor_id: str) -> ActorConfig:
    return ActorConfig(
        actor_id=actor_id, heartbeat_interval=0.1, liveness=20, grace_period=1.0, linger=0.2
    )


class Router(Actor):
    """A router-shaped actor: answers StatusQuery, records the KV events it hears."""

    role = "router"

    def __init__(self, config: ActorConfig) -> None:
        super().__init__(config)
        self.events: asyncio.Queue = asyncio.Queue()

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)

    async def on_status_query(self, msg: StatusQuery, inbound) -> ClusterStatus:
        return ClusterStatus(actors=[])

    async def on_block_stored(self, msg: BlockStored, inbound) -> None:
        self.events.put_nowait((msg.block_hashes, inbound.peer))


def client(role: str, actor_id: str) -> Actor:
    return type(f"{role.title()}Client", (Actor,), {"role": role})(make_config(actor_id))


@pytest.mark.parametrize(
    "role, answered",
    [
        ("frontend", True),
        ("operator", True),
        ("planner", True),
        ("decode", False),
        ("cache", False),
    ],
)
def test_a_request_from_a_role_that_may_not_send_it_is_refused(role, answered):
    async def scenario():
        async with Router(make_config("router-0")) as router, client(role, f"{role}-0") as asker:
            await asker.connect("to_router", router.endpoints["from_peers"], 5, "router-0")
            try:
                return await asker.request("router-0", StatusQuery(), timeout=5)
            except RemoteError as exc:
                return exc.error

    reply = asyncio.run(scenario())
    if answered:
        assert reply == ClusterStatus(actors=[], in_reply_to=2)
    else:
        assert (reply.code, reply.message) == (
            ErrorCode.FORBIDDEN,
            (
                f"StatusQuery may come from frontend, operator, planner, not from {role}-0 "
                f"(role {role})"
            ),
        )


@pytest.mark.parametrize(
    "role, stops", [("operator", True), ("decode", False), ("frontend", False)]
)
def test_only_an_operator_may_shut_an_actor_down(role, stops):
    async def scenario():
        async with Router(make_config("router-0")) as router, client(role, f"{role}-0") as sender:
            await sender.connect("to_router", router.endpoints["from_peers"], 5, "router-0")
            await sender.send("router-0", Shutdown(reason="test"))
            try:  # long enough when it stops; a short wait for what should not happen
                await asyncio.wait_for(router._stop_requested.wait(), 5 if stops else 0.5)
            except TimeoutError:
                pass
            return router._stop_requested.is_set()

    assert asyncio.run(scenario()) is stops


def test_events_are_the_connections_sender_whatever_their_frames_say():
    """decode-1 publishes on its own events socket, once as itself and once naming
    decode-0: the router hears the first as decode-1's and drops the second (before,
    the sender frame decided, and decode-1 could credit or retract decode-0's blocks)."""

    async def scenario():
        context = zmq.Context()
        try:
            hello = context.socket(zmq.DEALER)
            publisher = context.socket(zmq.PUB)
            for sock in (hello, publisher):
                sock.linger = 0
            publisher.bind("tcp://127.0.0.1:0")
            async with Router(make_config("router-0")) as router:
                hello.connect(router.endpoints["from_peers"])  # registered as decode-1
                hello.send(
                    encode(
                        Hello(
                            version=PROTOCOL_VERSION,
                            call_id=1,
                            actor_id="decode-1",
                            role="decode",
                            node="n",
                        )
                    )
                )
                await asyncio.to_thread(hello.poll, 5000)
                router.open(
                    "events_decode-1",
                    zmq.SUB,
                    publisher.last_endpoint.decode(),
                    bind=False,
                    peer="decode-1",
                )
                while True:  # the SUB has joined once a marker comes through
                    publisher.send_multipart([b"decode-1", encode(BlockStored(block_hashes=[0]))])
                    try:
                        await asyncio.wait_for(router.events.get(), 0.05)
                        break
                    except TimeoutError:
                        continue
                publisher.send_multipart([b"decode-0", encode(BlockStored(block_hashes=[7]))])
                publisher.send_multipart([b"decode-1", encode(BlockStored(block_hashes=[8]))])
                heard = [await asyncio.wait_for(router.events.get(), 5)]
                await asyncio.sleep(0.2)
                while not router.events.empty():
                    heard.append(router.events.get_nowait())
                return heard
        finally:
            context.destroy()

    assert asyncio.run(scenario()) == [([8], "decode-1")]


def test_a_frontend_takes_tokens_only_from_the_worker_it_placed_the_request_on(tiny_model_dir):
    from kvmesh.actors.frontend import FrontendActor, FrontendSettings, RequestState
    from kvmesh.frontend.models import ServedModel
    from kvmesh.params import SamplingParams

    frontend = FrontendActor(
        make_config("frontend-0"),
        FrontendSettings(
            models=(ServedModel("tiny", str(tiny_model_dir)),),
            router_endpoint="tcp://127.0.0.1:9",
        ),
    )

    async def scenario():
        state = RequestState("r-1", [1, 2, 3], SamplingParams(), worker="decode-0")
        frontend.requests["r-1"] = state
        for sender, token in (("decode-1", 66), ("decode-0", 5)):
            delta = Delta(request_id="r-1", new_token_ids=[token], new_text="x")
            await frontend.on_token_batch(
                TokenBatch(deltas=[delta]), Inbound(Route(f"to_{sender}"), sender, [])
            )
        return [state.stream.get_nowait().new_token_ids for _ in range(state.stream.qsize())]

    assert asyncio.run(scenario()) == [[5]]


class Frontend(Actor):
    """A frontend-shaped actor that records the tokens decode workers stream to it."""

    role = "frontend"

    def __init__(self, config: ActorConfig) -> None:
        super().__init__(config)
        self.deltas: asyncio.Queue = asyncio.Queue()

    async def on_token_batch(self, msg: TokenBatch, inbound) -> None:
        for delta in msg.deltas:
            self.deltas.put_nowait(delta)

    async def until_finished(self) -> list[Delta]:
        got = []
        while not got or (got[-1].finish_reason is None and got[-1].error is None):
            got.append(await asyncio.wait_for(self.deltas.get(), 30))
        return got


def test_a_decode_worker_takes_abort_and_request_ids_only_from_the_requests_frontend(
    tiny_model_dir,
):
    """frontend-1 aborts frontend-0's request and sends a Generate under its id: the
    first is ignored, the second refused with an error to frontend-1; frontend-0 gets
    every token it asked for."""
    from kvmesh.actors.router import RouterActor, RouterActorSettings
    from kvmesh.actors.worker import DecodeWorker, WorkerSettings
    from kvmesh.params import SamplingParams
    from kvmesh.protocol import Abort, Generate

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def scenario():
        router = RouterActor(
            make_config("router-0"),
            RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="tiny", block_size=16),
        )
        async with router:
            worker = DecodeWorker(
                make_config("decode-0"),
                WorkerSettings(
                    model_path=str(tiny_model_dir),
                    model_name="tiny",
                    endpoint="tcp://127.0.0.1:0",
                    events_endpoint="tcp://127.0.0.1:0",
                    router_endpoint=router.endpoints["from_peers"],
                    router_id="router-0",
                    num_blocks=64,
                ),
            )
            async with (
                worker,
                Frontend(make_config("frontend-0")) as owner,
                Frontend(make_config("frontend-1")) as other,
            ):
                for frontend in (owner, other):
                    await frontend.connect(
                        "to_decode", worker.endpoints["from_peers"], 30, "decode-0"
                    )
                await owner.send(
                    "decode-0",
                    Generate(request_id="r-1", prompt_token_ids=[1, 2, 3], params=params),
                )
                first = await asyncio.wait_for(owner.deltas.get(), 30)
                await other.send("decode-0", Abort(request_id="r-1"))
                await other.send(
                    "decode-0", Generate(request_id="r-1", prompt_token_ids=[4, 5], params=params)
                )
                refused = await other.until_finished()
                rest = await owner.until_finished()
                return [first, *rest], refused

    owned, refused = asyncio.run(scenario())
    assert sum(len(d.new_token_ids) for d in owned) == 24
    assert owned[-1].finish_reason == "length"
    assert [d.error for d in refused] == [
        StreamError(
            code=StreamErrorCode.REQUEST_ID_IN_USE,
            message="request id 'r-1' is already running here",
        )
    ]
