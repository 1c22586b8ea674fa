"""An actor bound on every interface (cluster.host = "0.0.0.0") tells its peers the
address they can dial, its node's, never tcp://0.0.0.0 (a peer on another host dialing
that reaches itself)."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from kvmesh.actors.base import Actor, ActorConfig, advertised


class Listener(Actor):
    """Binds a ROUTER at the endpoint it is given; nothing else."""

    role = "echo"
    senders = {}

    def __init__(self, config: ActorConfig, endpoint: str) -> None:
        super().__init__(config)
        self.endpoint = endpoint

    async def setup(self) -> None:
        self.open("from_peers", zmq.ROUTER, self.endpoint, bind=True)


@pytest.mark.parametrize(
    ("endpoint", "host", "expected"),
    [
        ("tcp://0.0.0.0:5600", "10.0.0.2", "tcp://10.0.0.2:5600"),
        ("tcp://[::]:5600", "10.0.0.2", "tcp://10.0.0.2:5600"),
        ("tcp://0.0.0.0:5600", "fd00::2", "tcp://[fd00::2]:5600"),
        ("tcp://0.0.0.0:5600", "", "tcp://0.0.0.0:5600"),  # no address to tell: as bound
        ("tcp://127.0.0.2:5600", "10.0.0.2", "tcp://127.0.0.2:5600"),  # a real address stays
        ("ipc:///run/k/decode-0", "10.0.0.2", "ipc:///run/k/decode-0"),
    ],
)
def test_advertised(endpoint, host, expected):
    assert advertised(endpoint, host) == expected


def test_a_peer_is_welcomed_with_the_advertised_endpoint_not_the_wildcard():
    async def scenario() -> tuple[str, str]:
        server = Listener(ActorConfig("server", advertise="127.0.0.1"), "tcp://0.0.0.0:0")
        client = Listener(ActorConfig("client"), "tcp://127.0.0.1:0")
        async with server, client:
            port = server.endpoints["from_peers"].rsplit(":", 1)[1]
            await client.connect("to_server", f"tcp://127.0.0.1:{port}", 5.0, "server")
            return server.endpoints["from_peers"], client.peers["server"].endpoints["from_peers"]

    own, told = asyncio.run(scenario())
    assert own == told
    assert own.startswith("tcp://127.0.0.1:") and own != "tcp://127.0.0.1:0"
