"""A short-lived client actor for tools: ask the router for the cluster's status."""

from __future__ import annotations

import asyncio
import os

from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.protocol import ClusterStatus, StatusQuery


class ClientActor(Actor):
    """Connects, asks, leaves; the router lists no `client` among the cluster's actors."""

    role = "client"


async def query_status(router_endpoint: str, key_dir=None, timeout: float = 5.0) -> ClusterStatus:
    """The router's registry; TimeoutError when no router answers at router_endpoint."""
    config = ActorConfig(actor_id=f"client-{os.getpid()}", key_dir=key_dir, linger=0.0)
    async with ClientActor(config) as client:
        router = await client.connect("to_router", router_endpoint, timeout)
        return await client.request(router, StatusQuery(), timeout)


def status(router_endpoint: str, key_dir=None, timeout: float = 5.0) -> ClusterStatus:
    return asyncio.run(query_status(router_endpoint, key_dir, timeout))
