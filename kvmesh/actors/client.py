"""A short-lived operator actor for tools: ask the router for the cluster's status."""

from __future__ import annotations

import asyncio
import os

from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.protocol import ClusterStatus, StatusQuery
from kvmesh.transport.keys import OPERATOR


class OperatorActor(Actor):
    """Connects, asks, leaves; the router lists no operator among the cluster's actors.
    With keys it holds the `operator` key (kvmesh keys generate writes one)."""

    role = OPERATOR


async def query_status(
    router_endpoint: str, router_id: str | None = None, key_dir=None, timeout: float = 5.0
) -> ClusterStatus:
    """The router's registry; TimeoutError when no router answers at router_endpoint."""
    config = ActorConfig(
        actor_id=f"{OPERATOR}:{os.getpid()}", key_dir=key_dir, key_name=OPERATOR, linger=0.0
    )
    async with OperatorActor(config) as client:
        router = await client.connect("to_router", router_endpoint, timeout, router_id)
        return await client.request(router, StatusQuery(), timeout)


def status(
    router_endpoint: str, router_id: str | None = None, key_dir=None, timeout: float = 5.0
) -> ClusterStatus:
    return asyncio.run(query_status(router_endpoint, router_id, key_dir, timeout))
