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

Security. One cluster keypair, `<key dir>/cluster.key` (public) and
`cluster.key_secret` (public + secret), written by `kvmesh keys generate DIR`. Every
actor of a cluster reads the same key directory, so each actor is both a CURVE server
and a CURVE client with that one keypair; separate server and client keypairs would buy
nothing, since every actor needs both secrets anyway. The rule is by direction:

    bind    -> curve_server; a ZAP handler (AsyncioAuthenticator) admits only clients
               whose public key is one of the `*.key` files in the key directory
    connect -> curve_client with curve_serverkey = the cluster public key, so it only
               completes a handshake with a holder of the cluster secret

So a peer without the secret gets no reply from a ROUTER, cannot feed a bound SUB or
PULL (its handshake is refused), receives nothing from a bound PUB or PUSH, and a
connecting SUB/PULL never talks to an impostor publisher. Which side binds does not
matter for security. Granting an outside client (an SDK user) access means dropping its
public `.key` file into the directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from kvmesh import protocol
from kvmesh.protocol import ErrorCode, MalformedMessage, Message

KEY_NAME = "cluster"
# Frames before the body: the ROUTER identity, or the sender id on SUB/PULL.
HEAD_FRAMES = {zmq.ROUTER: 1, zmq.DEALER: 0, zmq.SUB: 1, zmq.PULL: 1}

Buffer = bytes | bytearray | memoryview | zmq.Frame


@dataclass(frozen=True)
class CurveKeys:
    """The cluster keypair and the directory of public keys allowed to connect."""

    public: bytes
    secret: bytes
    allowed_dir: Path

    @classmethod
    def load(cls, key_dir: Path) -> CurveKeys:
        secret_file = Path(key_dir) / f"{KEY_NAME}.key_secret"
        if not secret_file.is_file():
            raise FileNotFoundError(
                f"key_dir {str(key_dir)!r} has no {secret_file.name}; "
                "write one with `kvmesh keys generate DIR`"
            )
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret-key")
        return cls(public=public, secret=secret, allowed_dir=Path(key_dir))


def generate_keys(key_dir: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write the cluster keypair into key_dir; returns (public file, secret file).

    The secret file is readable by its owner only. Refuses to replace an existing
    keypair unless force, since every actor of the cluster must hold the same one.
    """
    key_dir = Path(key_dir)
    public = key_dir / f"{KEY_NAME}.key"
    secret = key_dir / f"{KEY_NAME}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(
            f"{secret} already exists; replacing it cuts off every actor holding the old keys"
        )
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    previous = os.umask(0o077)  # no moment where the secret is readable by others
    try:
        zmq.auth.create_certificates(key_dir, KEY_NAME)
    finally:
        os.umask(previous)
    public.chmod(0o644)
    return public, secret


class Sockets:
    """The ZeroMQ context of one process and every socket opened from it.

    Create it inside the running event loop (the ZAP handler is an asyncio task).
    Every socket gets a bounded linger, and CURVE by direction when keys are given.
    """

    def __init__(self, keys: CurveKeys | None = None, linger: float = 1.0,
                 max_frame_size: int = -1) -> None:
        """max_frame_size: ZeroMQ drops a peer that sends a larger frame, before any of
        it is held in memory (ZMQ_MAXMSGSIZE); -1 = no limit."""
        self.context = zmq.asyncio.Context()
        self.keys = keys
        self._linger_ms = int(linger * 1000)
        self._max_frame_size = max_frame_size
        self._open: list[zmq.asyncio.Socket] = []
        self._auth: AsyncioAuthenticator | None = None
        if keys is not None:
            self._auth = AsyncioAuthenticator(self.context)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(keys.allowed_dir))

    def open(self, kind: int, endpoint: str, *, bind: bool) -> tuple[zmq.asyncio.Socket, str]:
        """A socket bound or connected to endpoint, and the endpoint it really has
        (`tcp://127.0.0.1:0` binds an ephemeral port)."""
        sock = self.context.socket(kind)
        sock.linger = self._linger_ms
        sock.maxmsgsize = self._max_frame_size
        if kind == zmq.ROUTER:
            sock.router_mandatory = 1  # a send to a vanished peer fails instead of vanishing
        if kind == zmq.SUB:
            sock.subscribe(b"")
        if self.keys is not None:
            sock.curve_publickey = self.keys.public
            sock.curve_secretkey = self.keys.secret
            if bind:
                sock.curve_server = True
            else:
                sock.curve_serverkey = self.keys.public
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
