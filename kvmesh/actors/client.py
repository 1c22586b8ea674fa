"""A short-lived operator actor for tools: ask the router for the cluster's status, or
its models' (`kvmesh models`)."""

from __future__ import annotations

import asyncio
import os

from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.protocol import ClusterStatus, Reply, Request, StatusQuery
from kvmesh.transport.keys import OPERATOR


class OperatorActor(Actor):
    """Connects, asks, leaves; the router lists no operator among the cluster's actors.
    With keys it holds the `operator` key (kvmesh keys generate writes one)."""

    role = OPERATOR


async def ask_router(
    request: Request,
    router_endpoint: str,
    router_id: str | None = None,
    key_dir=None,
    timeout: float = 5.0,
) -> Reply:
    """The router's answer to `request`; TimeoutError when no router answers at
    router_endpoint, RemoteError when it refuses."""
    config = ActorConfig(
        actor_id=f"{OPERATOR}:{os.getpid()}", key_dir=key_dir, key_name=OPERATOR, linger=0.0
    )
    async with OperatorActor(config) as client:
        router = await client.connect("to_router", router_endpoint, timeout, router_id)
        return await client.request(router, request, timeout)


def status(
    router_endpoint: str, router_id: str | None = None, key_dir=None, timeout: float = 5.0
) -> ClusterStatus:
    """The router's registry."""
    return asyncio.run(ask_router(StatusQuery(), router_endpoint, router_id, key_dir, timeout))
