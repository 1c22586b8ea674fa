"""The router's view of its members, with real ZeroMQ sockets in one process:

- a router that (re)starts while its workers keep their device prefix caches learns what
  they hold: once a registered worker's events arrive (its first LoadReport), the router
  asks it for a snapshot and indexes it;
- its status says which members the peers that need them cannot use: a worker whose
  events never reach it, a worker that reports it cannot reach its node's cache actor;
  `kvmesh status` shows such a member unhealthy, saying why;
- a worker that leaves (Actor.leave, as a draining worker does) is forgotten at once, as
  a clean departure, and an actor of another node under a connected actor's id is
  refused."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from kvmesh.actors.base import Actor, RemoteError
from kvmesh.actors.peers import Inbound, Route
from kvmesh.actors.router import RouterActor, RouterActorSettings
from kvmesh.cli import cli
from kvmesh.protocol import (
    ActorStatus,
    BlockStored,
    CacheSnapshot,
    CacheSnapshotQuery,
    ClusterStatus,
    LoadReport,
    StatusQuery,
    WorkerLoad,
)
from tests.actors.test_cache_and_router import RegisteredWorker, node_config, until

pytestmark = pytest.mark.timeout(60)


def make_router() -> RouterActor:
    settings = RouterActorSettings(endpoint="tcp://127.0.0.1:0", model_name="m", block_size=16)
    return RouterActor(node_config("router-0", "a"), settings)


class CachingWorker(RegisteredWorker):
    """A decode worker whose device pool holds `device` from before it registered; it
    publishes a LoadReport every 50 ms, and a BlockStored of `later` once asked."""

    role = "decode"

    def __init__(
        self, actor_id: str, device: list[int], later: list[int] = (), unreachable=()
    ) -> None:
        super().__init__(node_config(actor_id, "a"))
        self.device = device
        self.later = list(later)
        self.unreachable = list(unreachable)
        self.asked = 0
        self.reported = 0

    async def setup(self) -> None:
        await super().setup()
        self.supervise("report_load", self._report_load)

    async def _report_load(self) -> None:
        while True:
            report = LoadReport(load=WorkerLoad(), unreachable=self.unreachable)
            await self.emit("events_out", report)
            self.reported += 1
            await asyncio.sleep(0.05)

    async def on_cache_snapshot_query(self, msg: CacheSnapshotQuery, inbound) -> CacheSnapshot:
        self.asked += 1
        if self.later:  # stored after the snapshot: arrives as an ordinary event
            await self.emit("events_out", BlockStored(block_hashes=self.later))
        return CacheSnapshot(device=self.device)


def test_a_router_learns_the_device_blocks_its_workers_held_before_it_started():
    async def scenario():
        async with (
            CachingWorker("decode-0", device=[11, 12, 13], later=[14]) as holder,
            CachingWorker("decode-1", device=[]) as empty,
        ):
            async with make_router() as router:  # the first router: it learns
                await holder.register(router)
                await empty.register(router)
                await until(
                    lambda: router.index.num_blocks("decode-0") == 4 and empty.asked == 1,
                    "the snapshots",
                )
                first = router.index.overlaps([11, 12, 13, 14])
            await until(lambda: "router-0" not in holder.peers, "the router's goodbye")
            await until(lambda: "router-0" not in empty.peers, "the router's goodbye")
            async with make_router() as router:  # its successor learns it all again
                holder.device, holder.later = [11, 12, 13, 14], []
                await holder.register(router)
                await empty.register(router)
                await until(lambda: router.index.num_blocks("decode-0") == 4, "re-learning")
                await asyncio.sleep(0.3)  # more LoadReports: none asks again
                again = router.index.overlaps([11, 12, 13, 14])
                return first, again, holder.asked, empty.asked

    first, again, holder_asked, empty_asked = asyncio.run(scenario())
    assert {w: o.device for w, o in first.items()} == {"decode-0": 4}
    assert {w: o.device for w, o in again.items()} == {"decode-0": 4}
    assert (holder_asked, empty_asked) == (2, 2)  # once per registration


def test_status_names_the_members_their_peers_cannot_use(monkeypatch):
    monkeypatch.setattr("kvmesh.router.health.EVENTS_STALE_S", 1.0)
    cache = "cache-1 at tcp://127.0.0.2:7000 (this node's cache actor): no Welcome"

    async def scenario():
        async with (
            make_router() as router,
            CachingWorker("decode-0", device=[]) as fine,
            CachingWorker("decode-1", device=[], unreachable=[cache]) as lonely,
            CachingWorker("decode-2", device=[]) as unheard,
        ):
            await fine.register(router)
            await lonely.register(router)
            unheard.endpoints["events_out"] = "tcp://127.0.0.1:9"  # nobody listens there
            await unheard.register(router)
            await until(lambda: "decode-1" in router.loads, "decode-1's report")
            asking = Inbound(Route("from_peers"), None, [])
            problems = {}
            for _ in range(200):  # until decode-2 has been silent past EVENTS_STALE_S
                status = await router.on_status_query(StatusQuery(), asking)
                problems = {a.actor_id: a.problems for a in status.actors}
                if problems["decode-2"]:
                    break
                await asyncio.sleep(0.05)
            return problems

    assert asyncio.run(scenario()) == {
        "router-0": [],
        "decode-0": [],
        "decode-1": [f"cannot reach {cache}"],
        "decode-2": [
            "its events (tcp://127.0.0.1:9) have not reached router-0 ever since it "
            "registered: does this host reach that address?"
        ],
    }


def test_kvmesh_status_shows_an_unreachable_member_unhealthy_with_why(monkeypatch):
    monkeypatch.setattr("kvmesh.log.configure", lambda *args: None)
    problem = "cannot reach cache-1 at tcp://127.0.0.2:7000 (this node's cache actor): gone"
    rows = [
        ActorStatus(actor_id="router-0", role="router", node="a", pid=1, endpoints={}, alive=True),
        ActorStatus(
            actor_id="decode-1",
            role="decode",
            node="b",
            pid=2,
            endpoints={},
            alive=True,
            load=WorkerLoad(),
            problems=[problem],
        ),
    ]
    cluster = ClusterStatus(actors=rows)
    monkeypatch.setattr("kvmesh.actors.client.status", lambda *args, **kwargs: cluster)
    table = CliRunner().invoke(cli, ["status"])
    listed = CliRunner().invoke(cli, ["status", "--json"])
    assert (table.exit_code, listed.exit_code) == (0, 0), table.output + listed.output
    assert [line.split()[:5] for line in table.output.splitlines()[1:3]] == [
        ["router-0", "router", "a", "1", "alive"],
        ["decode-1", "decode", "b", "2", "unhealthy"],
    ]
    assert table.output.splitlines()[3] == f"  decode-1 is unhealthy: {problem}"
    health = {row["actor"]: (row["health"], row["problems"]) for row in json.loads(listed.output)}
    assert health == {"router-0": ("alive", []), "decode-1": ("unhealthy", [problem])}


def test_a_second_actor_under_a_connected_actors_id_from_another_node_is_refused():
    async def scenario():
        async with (
            make_router() as router,
            CachingWorker("decode-0", device=[]) as first,
            Actor(node_config("decode-0", "b")) as impostor,
            Actor(node_config("decode-0", "a")) as restarted,
        ):
            await first.register(router)
            endpoint = router.endpoints["from_peers"]
            with pytest.raises(RemoteError) as refused:
                await impostor.connect("to_router", endpoint, timeout=5)
            kept = router.peers["decode-0"].node, "router-0" in first.peers
            await restarted.connect("to_router", endpoint, timeout=5)  # its own node: a restart
            return refused.value.error, kept, router.peers["decode-0"].role

    error, kept, replaced_by = asyncio.run(scenario())
    assert error.code == "id_taken"
    assert error.message.startswith(
        "actor id 'decode-0' is taken by the decode of node a (pid "
    ) and error.message.endswith(
        "connected; this one is on node b: every node must read the same cluster.toml, "
        "a joining node's [[nodes]] entry appended after the others"
    )
    assert kept == ("a", True)
    assert replaced_by == "actor"  # the same node's Hello replaced the connection


def test_a_worker_that_cannot_tell_its_blocks_is_asked_once():
    class Blind(CachingWorker):
        async def on_cache_snapshot_query(self, msg, inbound) -> CacheSnapshot:
            self.asked += 1
            raise NotImplementedError("this engine keeps no prefix cache")

    async def scenario():
        async with make_router() as router, Blind("decode-0", device=[]) as blind:
            await blind.register(router)
            await until(lambda: blind.asked, "the question")
            since = blind.reported
            await until(lambda: blind.reported >= since + 10, "ten more load reports")
            return blind.asked, "decode-0" in router.workers

    assert asyncio.run(scenario()) == (1, True)


def test_a_worker_that_leaves_is_forgotten_at_once_as_a_clean_departure():
    async def scenario():
        async with make_router() as router, CachingWorker("decode-0", device=[]) as worker:
            seen = []

            async def on_router_gone(peer_id: str) -> None:
                seen.append((peer_id, worker.peers.left(peer_id)))

            worker.watch("router-0", on_router_gone)
            await worker.register(router)
            await worker.leave("router-0")
            await until(lambda: "decode-0" not in router.workers, "the router forgetting it")
            await until(lambda: seen, "the worker's watch")
            await worker.leave("router-0")  # not connected any more: nothing to do
            return seen, router.num_worker_deaths, "router-0" in worker.peers

    assert asyncio.run(scenario()) == ([("router-0", True)], 0, False)
