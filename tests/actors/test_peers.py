"""Peers alone, with a recording log: how the end of a connection is told. A Goodbye
(a clean shutdown) and any death while this actor shuts down are info; silence is a
warning. Either way the requests pending on the peer fail and its watches run."""

from __future__ import annotations

import asyncio

import pytest

from kvmesh.actors.peers import Peer, PeerDeadError, Peers, Route

INTERVAL, LIVENESS = 0.1, 3


class RecordingLog:
    """Stands in for a structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.lines.append((level, event, fields))


def make_peer(actor_id: str = "decode-0") -> Peer:
    return Peer(actor_id, "decode", "local", {}, Route("from_peers", actor_id.encode()))


def make_peers() -> tuple[Peers, RecordingLog, list[str], list[str]]:
    """Peers, its log, the ids buried, and the ids buried as having said Goodbye."""
    log = RecordingLog()
    buried: list[str] = []
    left: list[str] = []

    def bury(peer: Peer) -> asyncio.Task:
        buried.append(peer.actor_id)
        if peers.left(peer.actor_id):  # what a watch callback would ask
            left.append(peer.actor_id)
        return asyncio.create_task(asyncio.sleep(0))

    peers = Peers(INTERVAL, LIVENESS, log, bury)
    return peers, log, buried, left


def ends(log: RecordingLog) -> list[tuple[str, str]]:
    return [(level, event) for level, event, _ in log.lines if event != "peer_registered"]


def test_a_goodbye_ends_the_connection_at_info_and_fails_its_requests():
    async def scenario():
        peers, log, buried, left = make_peers()
        peer = make_peer()
        await peers.register(peer)
        _, pending = peers.expect(peer, peer.route)
        peers.leave(peer.route)
        with pytest.raises(PeerDeadError) as caught:
            await pending
        await asyncio.sleep(0.01)  # the watches' task ends: left() forgets the id
        return ends(log), buried, left, dict(peers), caught.value.reason, peers.left("decode-0")

    assert asyncio.run(scenario()) == (
        [("info", "peer_left")],
        ["decode-0"],
        ["decode-0"],
        {},
        "it said goodbye (shutting down)",
        False,
    )


@pytest.mark.parametrize(("shutting_down", "level"), [(False, "warning"), (True, "info")])
def test_silence_is_a_warning_unless_this_actor_is_shutting_down(shutting_down, level):
    async def scenario():
        peers, log, buried, left = make_peers()
        await peers.register(make_peer())
        peers.shutting_down = shutting_down
        now = asyncio.get_running_loop().time() + INTERVAL * LIVENESS + 1.0
        living = peers.reap_silent(now, stalled=False)
        return ends(log), buried, left, living

    assert asyncio.run(scenario()) == ([(level, "peer_dead")], ["decode-0"], [], [])


def test_a_goodbye_on_a_route_nobody_is_registered_on_is_ignored():
    async def scenario():
        peers, log, buried, left = make_peers()
        await peers.register(make_peer())
        peers.leave(Route("from_peers", b"stranger"))
        return ends(log), buried, list(peers)

    assert asyncio.run(scenario()) == ([], [], ["decode-0"])
