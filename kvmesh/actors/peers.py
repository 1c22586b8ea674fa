"""The peers of one Actor: who is registered on which route, the requests pending on
them, and their liveness.

Any message from a peer counts as a sign of life (`touch`); a peer silent for
liveness x heartbeat_interval seconds is declared dead (`reap_silent`): every request
pending on it raises PeerDeadError, then the actor's `bury` callback closes what
belonged to the connection and spawns the task that runs the actor's watches on it
(Actor.watch). Dead is final for that connection; `connect` again to reach a restarted
actor. A peer that says Goodbye (a clean shutdown) ends the same way, but its end is
logged at info, not as a warning, and `left(peer_id)` tells the watches so; so is any
death while this actor is itself shutting down (`shutting_down`).

Each registration is its own Peer record, and everything here acts on the record, not
on the id: a request waits on one connection, a death found on a route or by the
heartbeat ends one connection. So when an actor comes back under the same id (a
restart says Hello before its old connection went silent), the old connection's death
fails only its own requests and never ends the new one. A watch's callback takes only
an id, so a new connection with that id is registered only after the old one's watches
returned: a callback for the old connection cannot act on the new one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import zmq

from kvmesh.protocol import Error, ErrorCode, Hello, Reply, Welcome


class PeerDeadError(ConnectionError):
    """The peer was declared dead, or was never connected."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer!r} is dead: {reason}")
        self.peer = peer
        self.reason = reason


class Route(NamedTuple):
    """The way to a peer: a socket name, plus the routing id when it is our ROUTER."""

    socket: str
    identity: bytes | None = None


@dataclass(frozen=True)
class Inbound:
    """Where a message came from, and the extra frames that came with it."""

    route: Route  # the way back
    peer: str | None  # registered actor id (ROUTER/DEALER) or sending actor (SUB/PULL)
    frames: list[zmq.Frame]
    user: str | None = None  # the key name ZAP authenticated the connection as (keys only)

    @property
    def socket(self) -> str:
        return self.route.socket


@dataclass
class Peer:
    """A registered actor at the other end of a ROUTER/DEALER connection."""

    actor_id: str
    role: str
    node: str
    endpoints: dict[str, str]
    route: Route
    last_seen: float = 0.0
    pid: int = 0

    @classmethod
    def introduced(cls, card: Hello | Welcome, route: Route) -> Peer:
        return cls(card.actor_id, card.role, card.node, card.endpoints, route, pid=card.pid)


@dataclass
class _Pending:
    peer: Peer | None  # None while the Hello of connect() waits
    route: Route
    future: asyncio.Future


class Peers(Mapping[str, Peer]):
    """The registered peers of one actor, by actor id (read-only as a mapping), with
    their routes, the requests pending on them, and their liveness.

    `bury(peer)` is the actor's part of a death; it returns the task running the
    actor's watches on it, which a re-registration under that id waits for.
    """

    def __init__(
        self,
        heartbeat_interval: float,
        liveness: int,
        log,
        bury: Callable[[Peer], asyncio.Task],
    ) -> None:
        self._interval = heartbeat_interval
        self._liveness = liveness
        self._log = log
        self._bury = bury
        self._by_id: dict[str, Peer] = {}
        self._at: dict[Route, Peer] = {}
        self._burying: dict[str, asyncio.Task] = {}  # actor id -> its watches in progress
        self._left: set[str] = set()  # said Goodbye; until their watches returned
        self.shutting_down = False  # this actor drains or closes: deaths are expected
        self._pending: dict[int, _Pending] = {}
        self._call_ids = itertools.count(1)

    # --- the mapping: actor id -> Peer ---

    def __getitem__(self, actor_id: str) -> Peer:
        return self._by_id[actor_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, actor_id: object) -> bool:
        return actor_id in self._by_id

    def __repr__(self) -> str:
        return f"Peers({sorted(self._by_id)})"

    # --- registry ---

    def at(self, route: Route) -> Peer | None:
        """The peer registered on route, if any."""
        return self._at.get(route)

    def touch(self, route: Route) -> str | None:
        """A message came on route: a sign of life from its peer, whose id is returned."""
        peer = self._at.get(route)
        if peer is None:
            return None
        peer.last_seen = asyncio.get_running_loop().time()
        return peer.actor_id

    async def register(self, peer: Peer) -> None:
        """Register a new connection. One already registered under its id is declared
        dead, and the new one waits until that one's watches have returned (unless a
        watch's callback itself is registering)."""
        while True:
            old = self._by_id.get(peer.actor_id)
            if old is not None:
                self.declare_dead(old, "replaced by a new connection with its id")
            burial = self._burying.get(peer.actor_id)
            if burial is None or burial is asyncio.current_task():
                break
            await asyncio.wait({burial})  # cancelling the wait leaves the burial running
        peer.last_seen = asyncio.get_running_loop().time()
        self._by_id[peer.actor_id] = peer
        self._at[peer.route] = peer
        self._log.info("peer_registered", peer=peer.actor_id, peer_role=peer.role, node=peer.node)

    def declare_dead(self, peer: Peer, reason: str) -> None:
        """End this connection: fail its pending requests, then bury it. A no-op when it
        is already dead or replaced."""
        if self._by_id.get(peer.actor_id) is not peer:
            return
        del self._by_id[peer.actor_id]
        if self._at.get(peer.route) is peer:
            del self._at[peer.route]
        for pending in self._pending.values():
            if pending.peer is peer and not pending.future.done():
                pending.future.set_exception(PeerDeadError(peer.actor_id, reason))
        if peer.actor_id in self._left:
            self._log.info("peer_left", peer=peer.actor_id, reason=reason)
        elif self.shutting_down:
            self._log.info("peer_dead", peer=peer.actor_id, reason=reason)
        else:
            self._log.warning("peer_dead", peer=peer.actor_id, reason=reason)
        burial = self._bury(peer)
        self._burying[peer.actor_id] = burial
        burial.add_done_callback(partial(self._buried, peer.actor_id))

    def leave(self, route: Route, reason: str = "it said goodbye (shutting down)") -> None:
        """The peer on route said Goodbye (or we did, Actor.leave): end its connection
        now, as a clean one."""
        peer = self._at.get(route)
        if peer is not None:
            self._left.add(peer.actor_id)
            self.declare_dead(peer, reason)

    def left(self, actor_id: str) -> bool:
        """Whether actor_id's connection ended with its Goodbye (asked by a watch)."""
        return actor_id in self._left

    def _buried(self, actor_id: str, burial: asyncio.Task) -> None:
        if self._burying.get(actor_id) is burial:
            del self._burying[actor_id]
            self._left.discard(actor_id)

    # --- liveness ---

    def reap_silent(self, now: float, stalled: bool) -> list[Peer]:
        """Declare dead every peer silent past liveness, unless the actor's own loop
        stalled (their heartbeats may sit unread); return the living."""
        limit = self._interval * self._liveness
        living = []
        for peer in list(self._by_id.values()):
            silent = now - peer.last_seen
            if silent > limit and not stalled:
                self.declare_dead(
                    peer,
                    f"silent for {silent:.2f} s (liveness {self._liveness} x {self._interval} s)",
                )
            else:
                living.append(peer)
        return living

    # --- pending requests ---

    def expect(self, peer: Peer | None, route: Route) -> tuple[int, asyncio.Future]:
        """A fresh call id, and the future that its reply on route resolves."""
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = _Pending(peer, route, future)
        return call_id, future

    def forget(self, call_id: int) -> None:
        del self._pending[call_id]

    def resolve(self, reply: Reply, inbound: Inbound) -> None:
        """Hand a reply to the request it answers; an Error saying the peer no longer
        has us registered ends our connection to it."""
        if isinstance(reply, Error) and reply.code == ErrorCode.NOT_REGISTERED:
            peer = self._at.get(inbound.route)
            if peer is not None and inbound.route.identity is None:
                self.declare_dead(peer, "it no longer has us registered")
                return
        pending = self._pending.get(reply.in_reply_to)
        if pending is not None and pending.route == inbound.route:
            if not pending.future.done():
                pending.future.set_result((reply, inbound.frames))
        elif isinstance(reply, Error):
            self._log.warning(
                "error_received",
                socket=inbound.socket,
                peer=inbound.peer,
                code=reply.code,
                reason=reply.message,
            )
        else:
            self._log.info("late_reply", peer=inbound.peer, in_reply_to=reply.in_reply_to)

    def fail_pending(self, reason: str) -> None:
        """Fail every request still waiting (the actor is closing)."""
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionError(reason))
