"""ZeroMQ sockets for the control plane: framing, send/receive of protocol messages,
and optional CurveZMQ.

Wire frames (one ZeroMQ multipart message; no REQ-style empty delimiter):

    ROUTER side:   [identity, body, *extra]   identity: added/consumed by ZeroMQ
    DEALER side:   [body, *extra]
    PUB -> SUB:    [sender, body, *extra]     sender: the publishing actor's id; SUB
    PUSH -> PULL:  [sender, body, *extra]       filters on its prefix
    body  = one protocol message, MessagePack (kvmesh.protocol.encode), at most
            max_message_size bytes, checked before it is parsed
    extra = raw bulk frames (KV blocks, tensors), sent with copy=False and never parsed

Security (kvmesh/transport/keys.py says who holds which key). With a KeyRing every
socket speaks CURVE, by direction:

    bind    -> curve_server; the ZAP handler admits only clients whose public key is
               in the ring, and names the connection after the key: every message
               received on it carries the key's name (`user_of(frame)`)
    connect -> curve_client pinned to the public key of the actor it means to reach
               (`server=`), so it never talks to anyone else

So a peer without a key of the ring gets no reply from a ROUTER, cannot feed a bound
SUB or PULL, receives nothing from a bound PUB or PUSH, and a connecting socket never
talks to an impostor. Which side binds does not matter for security.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from kvmesh import protocol
from kvmesh.protocol import ErrorCode, MalformedMessage, Message
from kvmesh.transport.keys import KeyRing

# Frames before the body: the ROUTER identity, or the sender id on SUB/PULL.
HEAD_FRAMES = {zmq.ROUTER: 1, zmq.DEALER: 0, zmq.SUB: 1, zmq.PULL: 1}

Buffer = bytes | bytearray | memoryview | zmq.Frame


class RingAuthenticator(AsyncioAuthenticator):
    """ZAP: a CURVE client is admitted when its key is in the ring, under the key's name."""

    def __init__(self, context: zmq.asyncio.Context, ring: KeyRing) -> None:
        super().__init__(context)
        self.ring = ring

    def callback(self, domain: str, z85_public: bytes) -> bool:  # the credentials provider
        return self.ring.by_public(z85_public) is not None

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.ring.by_public(z85.encode(client_public_key)).name


def user_of(frame: zmq.Frame) -> str | None:
    """The key name ZAP gave the connection a received frame came on (bound sockets
    with keys only), else None."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user or None


class Sockets:
    """The ZeroMQ context of one process and every socket opened from it.

    Create it inside the running event loop (the ZAP handler is an asyncio task).
    Every socket gets a bounded linger, and CURVE by direction when keys are given.
    """

    def __init__(
        self, keys: KeyRing | None = None, linger: float = 1.0, max_frame_size: int = -1
    ) -> None:
        """max_frame_size: ZeroMQ drops a peer that sends a larger frame, before any of
        it is held in memory (ZMQ_MAXMSGSIZE); -1 = no limit."""
        self.context = zmq.asyncio.Context()
        self.keys = keys
        self._linger_ms = int(linger * 1000)
        self._max_frame_size = max_frame_size
        self._open: list[zmq.asyncio.Socket] = []
        self._auth: RingAuthenticator | None = None
        if keys is not None:
            self._auth = RingAuthenticator(self.context, keys)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._auth)

    def open(
        self, kind: int, endpoint: str, *, bind: bool, server: str | None = None
    ) -> tuple[zmq.asyncio.Socket, str]:
        """A socket bound or connected to endpoint, and the endpoint it really has
        (`tcp://127.0.0.1:0` binds an ephemeral port). With keys, a connecting socket
        names the actor it reaches (server): only that actor's key completes it."""
        sock = self.context.socket(kind)
        sock.linger = self._linger_ms
        sock.maxmsgsize = self._max_frame_size
        if kind == zmq.ROUTER:
            sock.router_mandatory = 1  # a send to a vanished peer fails instead of vanishing
        if kind == zmq.SUB:
            sock.subscribe(b"")
        if self.keys is not None:
            sock.curve_publickey = self.keys.own.public
            sock.curve_secretkey = self.keys.secret
            if bind:
                sock.curve_server = True
            elif server is None:
                sock.close(linger=0)
                raise ValueError(
                    f"connecting to {endpoint} with keys needs the actor id "
                    "it should reach, to pin its public key"
                )
            else:
                try:
                    sock.curve_serverkey = self.keys.identity(server).public
                except ValueError:
                    sock.close(linger=0)
                    raise
        try:
            if bind:
                sock.bind(endpoint)
                endpoint = sock.last_endpoint.decode()
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            verb = "bind" if bind else "connect"
            raise ValueError(
                f"cannot {verb} endpoint {endpoint!r}: {zmq.strerror(exc.errno)}"
            ) from None
        self._open.append(sock)
        return sock, endpoint

    def close(self, sock: zmq.asyncio.Socket, linger: float | None = None) -> None:
        """Close one socket (linger in seconds; default the configured bound)."""
        if sock in self._open:
            self._open.remove(sock)
        sock.close(linger=self._linger_ms if linger is None else int(linger * 1000))

    def close_all(self) -> None:
        """Close every socket within the linger bound, stop ZAP, end the context."""
        for sock in list(self._open):
            self.close(sock)
        if self._auth is not None:
            self._auth.stop()
        self.context.term()


def split(kind: int, frames: Sequence[zmq.Frame]) -> tuple[bytes | None, memoryview, list]:
    """(head, body, extra) of a received multipart message, by the socket's layout.

    head is the ROUTER identity or the SUB/PULL sender id (None on DEALER). Raises
    MalformedMessage when there are too few frames for the layout.
    """
    num_head = HEAD_FRAMES[kind]
    if len(frames) < num_head + 1:
        raise MalformedMessage(
            ErrorCode.MALFORMED,
            f"{len(frames)} frame(s); a message on this socket has "
            f"{'[head, body, *extra]' if num_head else '[body, *extra]'}",
        )
    head = frames[0].bytes if num_head else None
    return head, frames[num_head].buffer, list(frames[num_head + 1 :])


async def send(
    sock: zmq.asyncio.Socket,
    msg: Message | bytes,
    *,
    head: bytes | None = None,
    frames: Sequence[Buffer] = (),
    track: bool = False,
    flags: int = 0,
) -> zmq.MessageTracker | None:
    """Send [head?, body, *frames]; msg may be pre-encoded bytes.

    Extra frames go zero-copy. With track=True every extra frame is a tracked zmq.Frame
    and the returned tracker is done once ZeroMQ has released all of them: only then
    may the caller reuse or free those buffers.
    """
    body = msg if isinstance(msg, bytes) else protocol.encode(msg)
    parts: list[Buffer] = [body] if head is None else [head, body]
    tracker = None
    if track:
        tracked = [zmq.Frame(f, copy=False, track=True) for f in frames]
        tracker = zmq.MessageTracker(*tracked)
        parts.extend(tracked)
    else:
        parts.extend(frames)
    await sock.send_multipart(parts, flags=flags, copy=False)
    return tracker
