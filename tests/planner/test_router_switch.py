"""The router's side of a role switch: a registered worker re-registers in its new role
(role_switch) and keeps its index entry; one not registered is refused."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from kvmesh.actors.base import Actor, ActorConfig, RemoteError
from kvmesh.actors.peers import Inbound, Route
from kvmesh.actors.router import RouterActor, RouterActorSettings
from kvmesh.protocol import BlockStored, RegisterWorker, RouteRequest

pytestmark = pytest.mark.timeout(60)


def make_config(actor_id: str) -> ActorConfig:
    return ActorConfig(
        actor_id=actor_id, heartbeat_interval=0.1, liveness=5, grace_period=2.0, linger=0.5
    )


def make_router() -> RouterActor:
    settings = RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16)
    return RouterActor(make_config("router-0"), settings)


class Worker(Actor):
    """Stands in for a worker: registers, in a role it names."""

    role = "decode"

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
        self.open("events_out", zmq.PUB, "tcp://127.0.0.1:0", bind=True)

    async def register(self, router: RouterActor, role: str = "", role_switch: bool = False):
        if "to_router" not in self.endpoints and router.actor_id not in self.peers:
            await self.connect("to_router", router.endpoints["from_peers"], timeout=5)
        return await self.request(
            router.actor_id,
            RegisterWorker(
                model="m",
                block_size=16,
                num_blocks=64,
                max_num_seqs=8,
                events_endpoint=self.endpoints["events_out"],
                role=role,
                role_switch=role_switch,
            ),
            timeout=5,
        )


def test_a_switched_worker_keeps_its_index_and_takes_the_new_role():
    async def scenario():
        router = make_router()
        async with (
            router,
            Worker(make_config("decode-0")) as d0,
            Worker(make_config("decode-1")) as d1,
        ):
            await d0.register(router)
            await d1.register(router)
            router.index.apply("decode-0", BlockStored(block_hashes=[11, 12]))
            await d0.register(router, role="prefill", role_switch=True)
            status = await router.on_status_query(None, None)
            roles = {a.actor_id: a.role for a in status.actors if a.actor_id != "router-0"}
            inbound = Inbound(Route("from_peers"), "frontend-0", [])
            ask = RouteRequest(request_id="r", block_hashes=[11, 12], num_prompt_tokens=512)
            placed = await router.on_route_request(ask, inbound)
            return roles, placed.decode, placed.prefill, router.index.num_blocks("decode-0")

    roles, decode, prefill, num_blocks = asyncio.run(scenario())
    assert roles == {"decode-0": "prefill", "decode-1": "decode"}
    assert (decode, prefill) == ("decode-1", "decode-0")
    assert num_blocks == 2  # its index entry kept


@pytest.mark.parametrize(
    "role, role_switch, message",
    [
        (
            "",
            True,
            "registration refused: role_switch from a worker that is not registered: "
            "register it first",
        ),
        ("router", False, "registration refused: role 'router': expected one of prefill, decode"),
    ],
)
def test_a_bad_registration_is_refused(role, role_switch, message):
    async def scenario():
        router = make_router()
        async with router, Worker(make_config("decode-0")) as worker:
            with pytest.raises(RemoteError) as refused:
                await worker.register(router, role=role, role_switch=role_switch)
            return refused.value.error.message, sorted(router.workers)

    assert asyncio.run(scenario()) == (message, [])
