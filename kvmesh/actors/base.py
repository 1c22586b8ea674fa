"""The Actor base: one asyncio event loop per process, ZeroMQ sockets named by direction,
a dispatch table of `on_<message>` handlers, request-reply with liveness, and graceful
shutdown on SIGTERM/SIGINT.

asyncio (zmq.asyncio), not a zmq.Poller loop: `request()` awaits its reply while the
same loop keeps serving other messages, heartbeats are timers, drain awaits handlers in
progress, and the data plane's UCX binding is asyncio too. A Poller loop would rebuild
futures, timers and continuations by hand. The price: a handler must not block the loop
for longer than the liveness timeout, or peers declare this actor dead.

Connections, ROUTER/DEALER:

    connecting actor                                  accepting actor
    DEALER "to_router" ---Hello(version, id, ...)-->  ROUTER "from_peers"
                       <--Welcome | Error----------   version checked; registered
           <--- Heartbeat every heartbeat_interval, both ways --->
           <--- Goodbye from whichever side closes on purpose ----

Then either side may send one-way messages and requests to the other; `Peers`
(kvmesh/actors/peers.py) keeps who is registered, the requests pending on them, and
liveness: a silent peer is declared dead, its pending requests raise PeerDeadError and
the watches on it run. An actor that closes says Goodbye on every connection first: its
peers forget it at once, the same way, and log it at info, so a clean shutdown is told
apart from a crash (`self.peers.left(peer_id)` in a watch's callback). PUB/SUB and
PUSH/PULL carry one-way messages with no registration.

Handlers are `async def on_<snake_case_type>(self, msg, inbound)`, found once, when the
class is created: an `on_*` name that matches no message this actor can receive (a
typo, a reply type, a handler that is not async) is a TypeError there and then. A part
the actor holds (the KV data plane) adds its own with `handle(MessageType, handler)`.
Each message runs in its own task, so a handler may itself await `request()`. A
Request's handler returns its reply (a Message, or `(Message, frames)` to add bulk
frames); the runtime stamps `in_reply_to` and sends it back the way the request came.

Lifecycle, and the two helpers for what runs besides the handlers:

    start()   sockets' context, heartbeats, setup() (sockets, connections, watches,
              supervised tasks)
    serve     handlers run; supervise(name, fn, *args, retry=Retry(...)) runs a named
              background task: tracked, its crash logged (task_failed); with a Retry,
              an attempt that raises one of retry.errors is logged (retry.event) and
              made again after retry.delay s while the actor accepts work (every
              reconnect loop: a restarted router, a restarted cache actor)
              watch(peer_id | predicate, on_dead) calls `await on_dead(peer_id)` each
              time a matching peer is declared dead or leaves, until unwatch()
    stop()    (SIGTERM, SIGINT, Shutdown) new work refused; drain() and the handlers in
              progress awaited, within grace_period (a drain may first leave(peer):
              say Goodbye to the router, so it places nothing more here)
    close()   supervised tasks cancelled, watches dropped, handlers cancelled,
              Goodbye said, sockets closed. An actor whose close() releases what its
              tasks use (an engine, a pool) calls cancel_supervised() first.

A peer's watches run one after another, in the order they were made, in one task: a
new connection under that id is registered only after it ends (peers.py), so a
callback for the old connection never acts on the new one. Spawn, do not await, a
reconnection from a callback (supervise it).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import inspect
import os
import platform
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvmesh import protocol
from kvmesh.actors.peers import Inbound, Peer, PeerDeadError, Peers, Route
from kvmesh.protocol import (
    MAX_MESSAGE_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SENDERS,
    Error,
    ErrorCode,
    Goodbye,
    Heartbeat,
    Hello,
    MalformedMessage,
    Message,
    Ping,
    Pong,
    Reply,
    Request,
    Shutdown,
    Welcome,
)
from kvmesh.transport import messaging
from kvmesh.transport.keys import KeyRing, plays
from kvmesh.transport.messaging import Buffer, Sockets

log = structlog.get_logger(__name__)

# handler name -> its message: every message a handler may take, and the replies
HANDLED = {f"on_{protocol.snake_name(t)}": t for t in MESSAGE_TYPES if not issubclass(t, Reply)}
REPLIES = {f"on_{protocol.snake_name(t)}": t for t in MESSAGE_TYPES if issubclass(t, Reply)}
REPLY_KINDS = (zmq.ROUTER, zmq.DEALER)  # sockets where a message has a way back
RECEIVE_KINDS = frozenset(messaging.HEAD_FRAMES)
_HEARTBEAT = protocol.encode(Heartbeat())
_GOODBYE = protocol.encode(Goodbye())


class RemoteError(Exception):
    """The peer answered a request with an Error."""

    def __init__(self, peer: str, error: Error) -> None:
        super().__init__(f"{peer} answered {error.code}: {error.message}")
        self.peer = peer
        self.error = error


@dataclass(frozen=True)
class ActorConfig:
    """How one actor runs; times in seconds."""

    actor_id: str
    node: str = field(default_factory=platform.node)
    heartbeat_interval: float = 1.0
    liveness: int = 3  # silent intervals before a peer is declared dead
    max_message_size: int = MAX_MESSAGE_SIZE
    grace_period: float = 10.0  # bound on drain at shutdown
    linger: float = 1.0  # bound on flushing unsent messages at close
    # The host peers reach this actor at: it replaces a wildcard (0.0.0.0, ::) in the
    # endpoints announced in Hello/Welcome, which a peer on another host cannot dial.
    advertise: str = ""
    key_dir: Path | None = None  # CurveZMQ on every socket when set
    key_name: str = ""  # whose secret key this process holds; "" = actor_id's
    # A frame above this drops its sender's connection in ZeroMQ itself, unread (a
    # message up to it but over max_message_size is refused with an Error); 0 = four
    # times max_message_size. Workers raise it to their largest KV data-plane frame.
    max_frame_size: int = 0
    max_handlers: int = 4096  # handlers running at once; beyond, messages are refused

    @property
    def frame_limit(self) -> int:
        return self.max_frame_size or 4 * self.max_message_size

    def __post_init__(self) -> None:
        if not self.actor_id:
            raise ValueError("actor_id must be a non-empty string")
        for name in ("heartbeat_interval", "liveness", "max_message_size", "max_handlers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("grace_period", "linger", "max_frame_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


Handler = Callable[[Message, Inbound], Awaitable[object]]
OnDead = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Retry:
    """How a supervised task is retried: an attempt that raises one of `errors` is
    logged as `event` (a warning) and made again after `delay` seconds, while the actor
    accepts work. The delay is fixed, not a growing backoff: the peer it waits for is
    restarted within seconds (the launcher), and an attempt that reaches nobody already
    waits out its connect timeout for a Welcome."""

    errors: tuple[type[Exception], ...]
    event: str
    delay: float = 1.0


@dataclass(eq=False)
class Watch:
    """A callback for the deaths of the peers `matches` accepts (Actor.watch)."""

    matches: Callable[[str], bool]
    on_dead: OnDead


def any_peer(peer_id: str) -> bool:
    """Watch every peer: `actor.watch(any_peer, on_dead)`."""
    return True


class Actor:
    """One kvmesh process: sockets, peers, handlers, heartbeats, graceful shutdown.

    Subclasses set `role`, define `on_<message>` handlers, watch the peers whose death
    matters to them (`watch`), and open sockets, connect and start their background
    tasks (`supervise`) in `setup()`. `run()` serves until SIGTERM/SIGINT or a Shutdown
    message; tests use `async with actor:` instead.
    """

    role: ClassVar[str] = "actor"
    # message type -> the name of its on_* handler; built when the class is created
    _handler_names: ClassVar[dict[type[Message], str]]
    # Messages still handled while draining: those that finish work already in flight
    # (a stream's tokens, a transfer's blocks), as opposed to new work.
    drain_accepts: ClassVar[frozenset[type[Message]]] = frozenset()
    # Which roles may send which messages (protocol.SENDERS); an actor that tests the
    # runtime alone may clear it.
    senders: ClassVar[dict[type[Message], frozenset[str]]] = SENDERS

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._handler_names = handler_names(cls)

    def __init__(self, config: ActorConfig) -> None:
        self.config = config
        self.actor_id = config.actor_id
        self.log = log.bind(actor=config.actor_id, role=self.role)
        self.peers = Peers(config.heartbeat_interval, config.liveness, self.log, self._bury)
        self.endpoints: dict[str, str] = {}  # bound sockets, announced in Hello/Welcome
        self._handlers: dict[type[Message], Handler] = {
            message_type: getattr(self, name)
            for message_type, name in type(self)._handler_names.items()
        }
        self._keys = self._load_keys(config)
        self._sender = config.actor_id.encode()
        self._sockets: Sockets | None = None
        self._socks: dict[str, zmq.asyncio.Socket] = {}
        self._kinds: dict[str, int] = {}
        self._socket_peer: dict[str, str] = {}  # connected SUB/PULL -> the actor it reaches
        self._readers: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()  # handlers and watches in progress
        self._supervised: set[asyncio.Task] = set()  # supervise()'s, until they end
        self._watches: list[Watch] = []
        # the runtime's own, not supervised: it beats on while a subclass's close()
        # releases its parts, until the sockets close
        self._heartbeat_task: asyncio.Task | None = None
        self._accepting = True
        self._stop_requested = asyncio.Event()
        self.exit_code = 0  # what run() returns once stopped
        self._connecting: dict[str, asyncio.Future] = {}  # peer id -> connect() under way

    def _load_keys(self, config: ActorConfig) -> KeyRing | None:
        """The key ring, when the cluster has keys; this actor's own key must name it."""
        if config.key_dir is None:
            return None
        ring = KeyRing(config.key_dir, config.key_name or config.actor_id)
        if not ring.own.admits(config.actor_id, self.role):
            raise ValueError(
                f"key {ring.own.name!r} is for {ring.own.role} {ring.own.name}, not for "
                f"{self.role} {config.actor_id}"
            )
        return ring

    def handle(self, message_type: type[Message], handler: Handler) -> None:
        """Run `handler` for each message_type received: how a part the actor holds
        (the KV data plane) adds its handlers. TypeError for a type that is not a
        receivable message, a handler that is not async, or a type already handled."""
        if message_type not in HANDLED.values():
            raise TypeError(
                f"{type(self).__name__}.handle: {message_type!r} is not a non-reply "
                "message of kvmesh.protocol"
            )
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"{type(self).__name__}.handle: {handler!r} must be async def")
        current = self._handlers.get(message_type)
        if current is not None:
            raise TypeError(
                f"{type(self).__name__}.handle: {message_type.__name__} is handled "
                f"already, by {current.__qualname__}"
            )
        self._handlers[message_type] = handler

    # --- hooks for subclasses ---

    async def setup(self) -> None:
        """Open sockets and connect to peers. Runs inside start()."""

    async def drain(self) -> None:
        """Finish work in progress before exit (bounded by grace_period). Handlers in
        progress are awaited too, after this returns."""

    # --- lifecycle ---

    async def __aenter__(self) -> Actor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the sockets' context, run setup(), start heartbeating."""
        self._sockets = Sockets(self._keys, self.config.linger, self.config.frame_limit)
        self._heartbeat_task = asyncio.create_task(self._heartbeat())
        try:
            await self.setup()
        except BaseException:  # nothing half-open left behind (a context never ended hangs)
            await self.close()
            raise
        self.log.info("actor_started", endpoints=self.endpoints)

    def stop(self) -> None:
        """Ask serve() to drain and exit; new work is refused from now on."""
        if not self._stop_requested.is_set():
            self.log.info("stop_requested")
        self._accepting = False
        self.peers.shutting_down = True
        self._stop_requested.set()

    async def serve(self, launcher: int = 0) -> None:
        """Serve until stop() (SIGTERM, SIGINT, Shutdown), drain, close.

        launcher: the pid of the `kvmesh up` that started this actor, or 0. A SIGTERM
        reaching the actor while that process is its parent is left to it: it came to
        every process at once (Slurm's scancel, a process group, a cgroup), and the
        launcher stops its actors in order (frontend, workers, router) with SIGINT."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm, launcher)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        try:
            await self.start()
            await self._stop_requested.wait()
            await self._drain_within_grace()
        finally:
            await self.close()

    def run(self, launcher: int = 0) -> int:
        """The process entry point: serve on a fresh event loop; returns the exit code."""
        asyncio.run(self.serve(launcher))
        return self.exit_code

    def _on_sigterm(self, launcher: int) -> None:
        if launcher and os.getppid() == launcher:
            self.log.info("sigterm_left_to_launcher", launcher=launcher)
            return
        self.stop()

    async def _drain_within_grace(self) -> None:
        self._accepting = False
        self.log.info("draining", in_progress=len(self._tasks))
        try:
            await asyncio.wait_for(self._finish_work(), self.config.grace_period)
        except TimeoutError:
            self.log.warning("drain_timeout", unfinished=len(self._tasks))

    async def _finish_work(self) -> None:
        await self.drain()
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Stop now: cancel supervised tasks, drop watches, cancel handlers and loops,
        say Goodbye, close sockets (linger bounded). Closing twice is harmless."""
        self.peers.shutting_down = True
        await self.cancel_supervised()
        self._watches.clear()
        tasks = [t for t in (self._heartbeat_task, *self._readers.values(), *self._tasks) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._say_goodbye()
        self.peers.fail_pending(f"actor {self.actor_id} closed")
        if self._sockets is not None:
            self._sockets.close_all()
            self._sockets = None
        self._socks.clear()
        self._readers.clear()
        self.log.info("actor_closed")

    async def leave(self, peer_id: str) -> None:
        """Say Goodbye to one registered peer and end that connection, while serving on:
        the peer forgets us at once, as at our close (a draining worker leaves the
        router first, so no new work is placed on it). Our watches on it run as after
        its own Goodbye (`self.peers.left(peer_id)` is true). No-op for a stranger."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        route = peer.route
        sock = self._socks.get(route.socket)
        if sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                await messaging.send(sock, _GOODBYE, head=route.identity, flags=zmq.NOBLOCK)
        if route.identity is None:  # our DEALER: closed within linger, the Goodbye flushed
            self._close_socket(route.socket, linger=self.config.linger)
        self.peers.leave(route, reason="we said goodbye (leaving)")

    async def _say_goodbye(self) -> None:
        """Tell every registered peer we are going (best effort: the linger bound flushes
        it), so it forgets us now instead of declaring us dead after liveness."""
        for peer in list(self.peers.values()):
            sock = self._socks.get(peer.route.socket)
            if sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    await messaging.send(
                        sock, _GOODBYE, head=peer.route.identity, flags=zmq.NOBLOCK
                    )

    # --- sockets ---

    def open(
        self, name: str, kind: int, endpoint: str, *, bind: bool, peer: str | None = None
    ) -> str:
        """Open socket `name` (by direction: from_peers, events_out, to_router, ...) of a
        zmq kind, bound or connected to endpoint; returns the real endpoint.

        peer: the actor a connecting socket reaches (with keys, only its key completes
        the connection). What a connected SUB or PULL receives is that actor's, whatever
        its frames say."""
        assert self._sockets is not None, f"open({name!r}) before start()"
        if name in self._socks:
            raise ValueError(f"socket {name!r} is already open")
        sock, endpoint = self._sockets.open(kind, endpoint, bind=bind, server=peer)
        self._socks[name] = sock
        self._kinds[name] = kind
        if bind:
            self.endpoints[name] = advertised(endpoint, self.config.advertise)
        elif kind in (zmq.SUB, zmq.PULL) and peer is not None:
            self._socket_peer[name] = peer
        if kind in RECEIVE_KINDS:
            self._readers[name] = asyncio.create_task(self._read(name, sock))
        return endpoint

    def _close_socket(self, name: str, linger: float = 0.0) -> None:
        reader = self._readers.pop(name, None)
        if reader is not None:
            reader.cancel()
        sock = self._socks.pop(name, None)
        if sock is not None:
            self._sockets.close(sock, linger=linger)
        self.endpoints.pop(name, None)
        self._socket_peer.pop(name, None)

    async def connect(
        self, name: str, endpoint: str, timeout: float, peer: str | None = None
    ) -> str:
        """Open DEALER `name` to a peer's ROUTER, say Hello; returns the peer's actor id.

        peer: the actor meant (required with keys): a Welcome from anyone else is a
        ConnectionError. Raises RemoteError if the peer refuses (e.g. another protocol
        version, or a key that is not our id) and TimeoutError if no Welcome comes
        (nobody there, or other keys).
        """
        self.open(name, zmq.DEALER, endpoint, bind=False, peer=peer)
        try:
            welcome, _ = await self._exchange(Route(name), None, Hello(**self._card()), timeout)
            if not isinstance(welcome, Welcome):
                raise ConnectionError(f"{endpoint} answered Hello with {type(welcome).__name__}")
            self._check_welcome(welcome, endpoint, peer)
            await self.peers.register(Peer.introduced(welcome, Route(name)))
        except TimeoutError:
            self._close_socket(name)
            raise TimeoutError(
                f"no Welcome from {endpoint} within {timeout} s "
                "(is an actor serving there, with the same keys?)"
            ) from None
        except BaseException:
            self._close_socket(name)
            raise
        return welcome.actor_id

    def _check_welcome(self, welcome: Welcome, endpoint: str, peer: str | None) -> None:
        if peer is not None and welcome.actor_id != peer:
            raise ConnectionError(f"{endpoint} is {welcome.actor_id}, not {peer}")
        if self._keys is None:
            return
        pinned = self._keys.identity(peer)  # the key the handshake was pinned to
        if not pinned.admits(welcome.actor_id, welcome.role):
            raise ConnectionError(
                f"{endpoint} says it is {welcome.role} {welcome.actor_id}, "
                f"but its key is {pinned.role}'s"
            )

    async def ensure_connected(self, peer: str, endpoint: str, timeout: float) -> None:
        """Connect to `peer` at `endpoint` unless already connected; concurrent callers
        for the same peer share one connection attempt."""
        if peer in self.peers:
            return
        attempt = self._connecting.get(peer)
        if attempt is None:
            attempt = asyncio.ensure_future(self.connect(f"to_{peer}", endpoint, timeout, peer))
            self._connecting[peer] = attempt
            attempt.add_done_callback(lambda _: self._connecting.pop(peer, None))
        await asyncio.shield(attempt)

    # --- sending ---

    async def request(
        self, peer: str, msg: Request, timeout: float, *, frames: Sequence[Buffer] = ()
    ) -> Message:
        """Send a request to a registered peer and return its reply.

        Raises PeerDeadError (peer declared dead meanwhile, or not connected),
        TimeoutError (no reply within timeout), RemoteError (the reply is an Error).
        """
        reply, _ = await self.request_frames(peer, msg, timeout, frames=frames)
        return reply

    async def request_frames(
        self, peer: str, msg: Request, timeout: float, *, frames: Sequence[Buffer] = ()
    ) -> tuple[Message, list[zmq.Frame]]:
        """request(), also returning the reply's extra frames."""
        target = self.peers.get(peer)
        if target is None:
            raise PeerDeadError(peer, "not connected")
        return await self._exchange(target.route, target, msg, timeout, frames)

    async def send(
        self, peer: str, msg: Message, *, frames: Sequence[Buffer] = (), track: bool = False
    ) -> zmq.MessageTracker | None:
        """Send a one-way message to a registered peer (see messaging.send for track)."""
        target = self.peers.get(peer)
        if target is None:
            raise PeerDeadError(peer, "not connected")
        return await self._send(target.route, msg, frames, track=track)

    async def emit(
        self, socket: str, msg: Message, *, frames: Sequence[Buffer] = (), track: bool = False
    ) -> zmq.MessageTracker | None:
        """Publish (PUB) or push (PUSH) a one-way message on socket `socket`."""
        if self._kinds.get(socket) not in (zmq.PUB, zmq.PUSH):
            raise ValueError(f"emit needs an open PUB or PUSH socket; {socket!r} is not one")
        sock = self._socks[socket]
        return await messaging.send(sock, msg, head=self._sender, frames=frames, track=track)

    async def _exchange(
        self,
        route: Route,
        peer: Peer | None,
        msg: Request,
        timeout: float,
        frames: Sequence[Buffer] = (),
    ) -> tuple[Message, list[zmq.Frame]]:
        call_id, future = self.peers.expect(peer, route)
        stamped = msgspec.structs.replace(msg, call_id=call_id)
        label = route.socket if peer is None else peer.actor_id
        try:
            await asyncio.wait_for(self._send_then(future, route, stamped, frames), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{label} sent no reply to {type(msg).__name__} within {timeout} s"
            ) from None
        finally:
            self.peers.forget(call_id)
        reply, reply_frames = future.result()
        if isinstance(reply, Error):
            raise RemoteError(label, reply)
        return reply, reply_frames

    async def _send_then(self, future, route, msg, frames) -> None:
        try:
            await self._send(route, msg, frames)
        except (asyncio.CancelledError, zmq.ZMQError):
            if not future.done():
                raise
            # else the peer was declared dead (its socket closed) mid-send: say so below
        await future

    async def _send(
        self,
        route: Route,
        msg: Message | bytes,
        frames: Sequence[Buffer] = (),
        *,
        track: bool = False,
        flags: int = 0,
    ) -> zmq.MessageTracker | None:
        peer = self.peers.at(route)
        label = route.socket if peer is None else peer.actor_id
        sock = self._socks.get(route.socket)
        if sock is None:
            raise PeerDeadError(label, "its socket is closed")
        try:
            return await messaging.send(
                sock, msg, head=route.identity, frames=frames, track=track, flags=flags
            )
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if peer is None:
                raise PeerDeadError(route.identity.hex(), "unreachable") from None
            self.peers.declare_dead(peer, "unreachable: its connection is gone")
            raise PeerDeadError(peer.actor_id, "unreachable") from None

    # --- receiving ---

    async def _read(self, name: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError:
                # closed while handling its own last message (a peer's Goodbye on our
                # DEALER buries that connection): nothing more to read
                if self._socks.get(name) is not sock:
                    return
                raise
            try:
                await self._receive(name, frames)
            except Exception:  # the last guard: a bug here must not stop the socket
                self.log.exception("receive_failed", socket=name)

    async def _receive(self, name: str, frames: list[zmq.Frame]) -> None:
        kind = self._kinds[name]
        route = Route(name, frames[0].bytes if kind == zmq.ROUTER else None)
        peer = self.peers.touch(route) if kind in REPLY_KINDS else None
        user = messaging.user_of(frames[0]) if self._keys is not None else None
        try:
            head, body, extra = messaging.split(kind, frames)
        except MalformedMessage as exc:
            await self._reject(Inbound(route, peer, [], user), exc.code, str(exc))
            return
        if kind in (zmq.SUB, zmq.PULL):
            # the connection says who sent it; the sender's own head frame only has to agree
            peer = self._socket_peer.get(name) or user or head.decode(errors="replace")
            if head != peer.encode():
                self.log.warning(
                    "message_rejected",
                    socket=name,
                    peer=peer,
                    code=ErrorCode.FORBIDDEN,
                    reason=f"sent as {head.decode(errors='replace')!r} on {peer}'s connection",
                )
                return
        inbound = Inbound(route, peer, extra, user)
        try:
            msg = protocol.decode(body, self.config.max_message_size)
        except MalformedMessage as exc:
            header = protocol.peek_hello(body) if exc.code == ErrorCode.MALFORMED else None
            if header is not None and header.version != PROTOCOL_VERSION:
                await self._refuse_version(inbound, header.version, header.call_id)
            else:
                await self._reject(inbound, exc.code, str(exc))
            return
        if isinstance(msg, Reply):
            self.peers.resolve(msg, inbound)
            if isinstance(msg, Error) and msg.in_reply_to is None and msg.request_id:
                self.request_refused(msg, inbound)
        elif isinstance(msg, Hello) and msg.version != PROTOCOL_VERSION:
            await self._refuse_version(inbound, msg.version, msg.call_id)
        elif isinstance(msg, Goodbye):
            if kind in REPLY_KINDS:
                self.peers.leave(route)
        elif not isinstance(msg, Heartbeat):  # a heartbeat's work is the last_seen above
            refusal = self._refusal(kind, peer, msg)
            if refusal is None:
                self._spawn(self._handle(self._handlers[type(msg)], msg, inbound))
            else:
                call_id = msg.call_id if isinstance(msg, Request) else None
                await self._reject(inbound, *refusal, call_id, getattr(msg, "request_id", None))

    def _refusal(self, kind: int, peer: str | None, msg: Message) -> tuple[str, str] | None:
        """(code, reason) when this decoded message must not reach a handler."""
        name = type(msg).__name__
        if kind == zmq.ROUTER and peer is None and not isinstance(msg, Hello):
            return ErrorCode.NOT_REGISTERED, f"{name} from an unregistered peer; send Hello first"
        senders = self.senders.get(type(msg))
        if senders is not None:
            role = self.role_of(peer)
            if not plays(role, senders):
                return (
                    ErrorCode.FORBIDDEN,
                    f"{name} may come from {', '.join(sorted(senders))}, "
                    f"not from {peer} (role {role})",
                )
        if type(msg) not in self._handlers:
            return (
                ErrorCode.UNKNOWN_TYPE,
                f"actor {self.actor_id} ({self.role}) has no {name} handler",
            )
        if not self._accepting and type(msg) not in self.drain_accepts:
            return (
                ErrorCode.SHUTTING_DOWN,
                f"actor {self.actor_id} is draining and takes no new work",
            )
        if len(self._tasks) >= self.config.max_handlers:
            return (
                ErrorCode.OVERLOADED,
                f"actor {self.actor_id} has {len(self._tasks)} handlers running "
                f"(max_handlers); {name} refused",
            )
        return None

    async def _handle(self, handler: Handler, msg: Message, inbound: Inbound) -> None:
        try:
            result = await handler(msg, inbound)
        except Exception as exc:
            self.log.exception("handler_failed", message_type=type(msg).__name__, peer=inbound.peer)
            result = Error(
                code=ErrorCode.HANDLER_FAILED, message=f"{type(msg).__name__} handler: {exc!r}"
            )
        if not isinstance(msg, Request):
            return
        if result is None:
            result = Error(
                code=ErrorCode.NO_REPLY,
                message=f"the {type(msg).__name__} handler returned no reply",
            )
        reply, frames = result if isinstance(result, tuple) else (result, ())
        await self._reply(inbound, msg.call_id, reply, frames)

    async def _reply(
        self,
        inbound: Inbound,
        call_id: int | None,
        reply: Reply,
        frames: Sequence[Buffer] = (),
    ) -> None:
        if self._kinds[inbound.socket] not in REPLY_KINDS:
            self.log.warning("reply_dropped", socket=inbound.socket, reason="no way back")
            return
        reply = msgspec.structs.replace(reply, in_reply_to=call_id)
        try:
            await self._send(inbound.route, reply, frames)
        except PeerDeadError as exc:
            self.log.info("reply_dropped", socket=inbound.socket, reason=str(exc))

    async def _reject(
        self,
        inbound: Inbound,
        code: str,
        reason: str,
        call_id: int | None = None,
        request_id: str | None = None,
    ) -> None:
        """One log line, and an Error back where the socket has a way back."""
        self.log.warning(
            "message_rejected", socket=inbound.socket, peer=inbound.peer, code=code, reason=reason
        )
        if self._kinds[inbound.socket] in REPLY_KINDS:
            await self._reply(
                inbound, call_id, Error(code=code, message=reason, request_id=request_id)
            )

    def role_of(self, peer: str | None) -> str | None:
        """The role of a sender: its key's with keys, else what its Hello or Welcome
        said; None for an actor not registered here."""
        if peer is None:
            return None
        if self._keys is not None:
            with contextlib.suppress(ValueError):
                return self._keys.identity(peer.partition(":")[0]).role
            return None
        registered = self.peers.get(peer)
        return registered.role if registered is not None else None

    def request_refused(self, error: Error, inbound: Inbound) -> None:
        """A peer refused a one-way message about request `error.request_id` (it was
        draining, or did not know us): actors that own requests end or move it here."""

    async def _refuse_version(self, inbound: Inbound, version: int, call_id: int) -> None:
        await self._reject(
            inbound,
            ErrorCode.VERSION_MISMATCH,
            f"peer speaks protocol version {version}, this actor speaks version {PROTOCOL_VERSION}",
            call_id,
        )

    # --- background tasks and peer watches ---

    def supervise(
        self, name: str, fn: Callable[..., Awaitable[None]], *args, retry: Retry | None = None
    ) -> asyncio.Task:
        """Run `await fn(*args)` as a background task of this actor, named `name`: tracked
        until it ends, cancelled at close(), its crash logged (task_failed). With retry,
        made again after a failure in retry.errors while the actor accepts work (and
        not at all once it drains). Returns the task, to wait for its first success."""
        task = asyncio.create_task(self._run_supervised(name, fn, args, retry), name=name)
        self._supervised.add(task)
        task.add_done_callback(self._supervised.discard)
        return task

    async def cancel_supervised(self) -> None:
        """Cancel every supervised task and wait for them to end; close() does it first."""
        tasks = list(self._supervised)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_supervised(self, name: str, fn, args: tuple, retry: Retry | None) -> None:
        # fn is called here, not by supervise(): a task cancelled before it ran (the
        # actor closed) leaves no coroutine never awaited
        try:
            if retry is None:
                await fn(*args)
                return
            while self._accepting:
                try:
                    await fn(*args)
                    return
                except retry.errors as exc:
                    self.log.warning(retry.event, task=name, error=str(exc))
                    await asyncio.sleep(retry.delay)
        except Exception:
            self.log.exception("task_failed", task=name)

    def watch(self, peer: str | Callable[[str], bool], on_dead: OnDead) -> Watch:
        """Call `await on_dead(peer_id)` each time a peer is declared dead (or leaves,
        `self.peers.left(peer_id)`) whose id is `peer`, or which `peer(peer_id)`
        accepts (any_peer: all of them); until unwatch() or close(). Its pending
        requests have failed already; a new connection under its id waits for the
        callbacks to return, so a callback spawns (supervise), never awaits, a
        reconnection to it."""
        matches = peer if callable(peer) else lambda peer_id: peer_id == peer
        watch = Watch(matches, on_dead)
        self._watches.append(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Stop a watch; its callback is not called again."""
        if watch in self._watches:
            self._watches.remove(watch)

    def _bury(self, peer: Peer) -> asyncio.Task:
        """Peers declared `peer` dead: close our DEALER to it, run the watches on it."""
        if peer.route.identity is None:  # our DEALER: nothing else uses it
            self._close_socket(peer.route.socket)
        return self._spawn(self._run_watches(peer.actor_id))

    async def _run_watches(self, peer_id: str) -> None:
        for watch in [w for w in self._watches if w.matches(peer_id)]:
            if watch not in self._watches:  # unwatched by a callback before it
                continue
            try:
                await watch.on_dead(peer_id)
            except Exception:
                self.log.exception("watch_failed", peer=peer_id)

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval
        loop = asyncio.get_running_loop()
        last_tick = loop.time()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            # After a stall of this loop, peers' heartbeats may sit unread in our
            # sockets: judge nobody until the readers have had a turn.
            stalled = now - last_tick > 2 * interval
            last_tick = now
            for peer in self.peers.reap_silent(now, stalled):
                with contextlib.suppress(zmq.Again, PeerDeadError):
                    await self._send(peer.route, _HEARTBEAT, flags=zmq.NOBLOCK)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task:
        """A handler or the watches of a death: counted against max_handlers, awaited
        by drain, cancelled at close."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- built-in handlers ---

    async def on_hello(self, msg: Hello, inbound: Inbound) -> Welcome | Error:
        """Register the connecting actor (its version was checked before dispatch); with
        keys, only under the id and role its key names."""
        if inbound.route.identity is None:
            return Error(code=ErrorCode.MALFORMED, message="Hello goes to a ROUTER socket")
        if self._keys is not None:
            identity = self._keys.identity(inbound.user) if inbound.user else None
            if identity is None or not identity.admits(msg.actor_id, msg.role):
                reason = (
                    f"key {inbound.user!r} ({identity.role if identity else 'unknown'}) "
                    f"may not say Hello as {msg.role} {msg.actor_id!r}"
                )
                self.log.warning(
                    "hello_refused",
                    claimed=msg.actor_id,
                    role=msg.role,
                    key=inbound.user,
                    reason=reason,
                )
                return Error(code=ErrorCode.FORBIDDEN, message=reason)
        taken = self.peers.get(msg.actor_id)
        if taken is not None and taken.node != msg.node:
            # a restart comes back from its own node; this is another actor under the
            # same id (a joining node whose cluster.toml numbers the actors otherwise)
            reason = (
                f"actor id {msg.actor_id!r} is taken by the {taken.role} of node {taken.node} "
                f"(pid {taken.pid}), connected; this one is on node {msg.node}: every node "
                "must read the same cluster.toml, a joining node's [[nodes]] entry "
                "appended after the others"
            )
            self.log.warning("hello_refused", claimed=msg.actor_id, node=msg.node, reason=reason)
            return Error(code=ErrorCode.ID_TAKEN, message=reason)
        await self.peers.register(Peer.introduced(msg, inbound.route))
        return Welcome(**self._card())

    async def on_ping(self, msg: Ping, inbound: Inbound) -> Pong:
        """Answer a liveness probe."""
        return Pong()

    async def on_shutdown(self, msg: Shutdown, inbound: Inbound) -> None:
        """Drain and exit, as on SIGTERM."""
        self.log.info("shutdown_requested", by=inbound.peer, reason=msg.reason)
        self.stop()

    def _card(self) -> dict:
        """Who this actor is: the fields of its Hello and its Welcome."""
        return dict(
            version=PROTOCOL_VERSION,
            actor_id=self.actor_id,
            role=self.role,
            node=self.config.node,
            endpoints=dict(self.endpoints),
            pid=os.getpid(),
        )


def advertised(endpoint: str, host: str) -> str:
    """endpoint as peers dial it: a wildcard host (tcp://0.0.0.0:PORT, tcp://[::]:PORT)
    becomes `host` (an actor's node address); anything else, or no host, is kept."""
    scheme, _, rest = endpoint.partition("://")
    bound, _, port = rest.rpartition(":")
    if not host or scheme != "tcp" or bound not in ("0.0.0.0", "[::]", "*"):
        return endpoint
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def handler_names(cls: type[Actor]) -> dict[type[Message], str]:
    """An actor class's handlers: for each message it may receive, its
    `on_<snake_case_type>` method, if defined. TypeError naming each `on_*` method that
    matches no such message (a typo, a reply, a peer-death hook) and each handler that
    is not async def."""
    stray = [_stray_hint(n) for n in sorted(dir(cls)) if n.startswith("on_") and n not in HANDLED]
    if stray:
        raise TypeError(
            f"{cls.__name__} defines on_* methods that match no message it can receive "
            f"(kvmesh.protocol): {'; '.join(stray)}"
        )
    names = {HANDLED[n]: n for n in dir(cls) if n in HANDLED}
    sync = sorted(n for n in names.values() if not inspect.iscoroutinefunction(getattr(cls, n)))
    if sync:
        raise TypeError(f"{cls.__name__}: handlers must be async def: {sync}")
    return names


def _stray_hint(name: str) -> str:
    """Why the method `name` handles nothing."""
    if name in REPLIES:
        return f"{name}: {REPLIES[name].__name__} is a reply, which request() returns"
    if name == "on_peer_dead":
        return f"{name}: a peer's death is watched with self.watch(peer, callback)"
    close = difflib.get_close_matches(name, HANDLED, n=1)
    return f"{name}: did you mean {close[0]}?" if close else f"{name}: no such message"


Actor._handler_names = handler_names(Actor)  # subclasses': in Actor.__init_subclass__
