"""KV blocks over UCX (ucxx): optional (the `ucx` extra), used when it imports, never
required. Nothing here imports ucxx until a UcxWorker is made.

Worker addresses, not listeners: a receiving actor's UCX worker address travels in its
KvPoolInfo and a sender makes an endpoint from it. Measured on one host (ucxx 0.52,
64 MiB messages): such endpoints with endpoint_error_handling=False use shared memory
(sysv/cma, ~3 GB/s); with error handling UCX leaves those transports out and uses tcp
(~0.7 GB/s), as listener endpoints always do. So error handling is off towards a peer on
this node and on towards other nodes. Without it a send to a dead peer hangs rather than
failing (it does not abort the process): the control plane's liveness notices the death
and the send is cancelled, and its buffer is never reused.

ucxx has no remote memory access (put/rkey) in Python, so a chunk travels as one tagged
message from a packed staging buffer: the sender starts the tag send and sends KvWrite;
the receiver posts a worker-level tag receive (no endpoint needed on its side), unpacks
and answers KvWriteDone. A tag is the crc32 of the sender's actor id (high 32 bits) and
the sending process's running count (low 32 bits): unique per receiver in practice.

ucxx binds its one context to the event loop that first uses it (its notifier thread
and progress tasks live there; a receive from another loop is cancelled): one event loop
per process, as an actor has. The worker and its endpoints are per process too, and an
endpoint is aborted only when its peer is dead: after this side aborts an endpoint to a
peer, tag receives of that peer's later messages are cancelled (measured, ucxx 0.52).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import zlib

import msgspec

from kvmesh.protocol import KvWrite


@functools.cache
def import_error() -> str | None:
    """None when ucxx imports here, else why it does not (checked once per process)."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # UCX prints warnings on stdout
    try:
        import ucxx  # noqa: F401
    except Exception as exc:  # ImportError, or OSError for a missing libucx/libcuda piece
        return f"{type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    """Whether ucxx imports in this process."""
    return import_error() is None


_worker: UcxWorker | None = None
_TAG_COUNT = itertools.count()  # per process: every link and plane here draws from it


def worker() -> UcxWorker:
    """This process's UcxWorker, made on first use (ucxx starts its context then)."""
    global _worker
    if _worker is None:
        _worker = UcxWorker()
    return _worker


class UcxWorker:
    """The UCX worker of this process (ucxx's one global context): its address, tag
    receives, and one endpoint per peer worker address. Get it with worker()."""

    def __init__(self) -> None:
        import ucxx

        self._ucxx = ucxx
        self.address: bytes = ucxx.get_worker_address().tobytes()
        self._endpoints: dict[bytes, object] = {}

    async def endpoint(self, address: bytes, same_node: bool):
        """The endpoint to the worker at address, made on first use."""
        self._progress()
        ep = self._endpoints.get(address)
        if ep is None:
            ep = await self._ucxx.create_endpoint_from_worker_address(
                self._ucxx.get_ucx_address_from_buffer(address),
                endpoint_error_handling=not same_node,
            )
            self._endpoints[address] = ep
        return ep

    async def recv(self, buffer, tag: int) -> None:
        """Receive the tag message `tag` into buffer (its exact size)."""
        self._progress()
        await self._ucxx.recv(buffer, tag=tag)

    def _progress(self) -> None:
        # ucxx drives a worker from each event loop that asks (a no-op after the first
        # call per loop); a worker-level receive does not ask by itself.
        self._ucxx.continuous_ucx_progress(asyncio.get_running_loop())

    def forget(self, address: bytes) -> None:
        """Drop the endpoint to a dead peer without a closing handshake."""
        ep = self._endpoints.pop(address, None)
        if ep is not None:
            ep.abort()


class UcxLink:
    """Writes to one peer: packed chunks as UCX tag messages."""

    backend = "ucx"
    chunked = True

    def __init__(self, channel, peer: str, worker: UcxWorker, address: bytes, same_node: bool):
        self.channel = channel
        self.peer = peer
        self.worker = worker
        self.address = address
        self.same_node = same_node
        self._tag_base = zlib.crc32(channel.actor_id.encode()) << 32

    async def send_packed(self, msg: KvWrite, lease, timeout: float) -> None:
        """Send lease.view tagged, and msg; return once the peer answered KvWriteDone."""
        tag = self._tag_base | (next(_TAG_COUNT) & 0xFFFFFFFF)
        msg = msgspec.structs.replace(msg, ucx_tag=tag)
        ep = await self.worker.endpoint(self.address, self.same_node) if lease.nbytes else None
        tasks = {asyncio.ensure_future(self.channel.request(self.peer, msg, timeout))}
        if ep is not None:
            tasks.add(asyncio.ensure_future(ep.send(lease.view.numpy(), tag=tag, force_tag=True)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            lease.never_reuse()  # UCX may still read it
            if isinstance(exc, self._ucxx_errors()):
                raise ConnectionError(f"UCX send to peer {self.peer!r} failed: {exc}") from exc
            raise

    def close(self, peer_dead: bool) -> None:
        """The endpoint is the process's: aborted only when the peer is dead."""
        if peer_dead:
            self.worker.forget(self.address)

    @staticmethod
    def _ucxx_errors() -> type:
        from ucxx.exceptions import UCXError

        return UCXError
