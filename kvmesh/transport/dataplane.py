"""The KV data plane: write blocks of this actor's KV pool into blocks of a peer's pool,
then tell the peer. The receiver owns the destination blocks; the sender writes them.

    sender: write(peer, id, src, dst)                    receiver: receive(KvWrite)
      ──KvPoolQuery(backends)──────────────────────────►   once per peer
      ◄─KvPoolInfo(layout, shm name+token, ucx address)─
      shm: copy the src blocks into the mapped peer pool
      zmq: pack a chunk of layers ══ extra frame ══════►   unpack into the dst blocks
      ucx: pack a chunk of layers ══ UCX tag message ══►   receive, unpack
      ──KvWrite(id, dst, layers, backend)──────────────►   those layers are in place
      ◄─KvWriteDone─────────────────────────────────────

Backend, picked once per peer at the first write; setting `backend` (default "auto"):
  shm  the peer's pool is a shared-memory segment this host maps (its token matches);
       between CUDA pools, CUDA IPC handles this process opens (cuda_ipc.py)
  ucx  else, when ucxx imports here and the peer sent a UCX worker address
  zmq  else: zero-copy frames on the control connection
A forced backend that cannot reach the peer is a ValueError naming the setting.

Chunks. A write moves in chunks of whole layers. zmq and ucx send each chunk (about
chunk_bytes) as its own KvWrite, at most `window` in flight: packing chunk k+1 overlaps
the sending of chunk k and the peer's unpacking of chunk k-1; no message holds the
control connection (and the heartbeats behind it) longer than one chunk takes; and
chunks stay under glibc's 32 MiB mmap threshold, so ZeroMQ's receive buffers are reused,
not faulted in afresh (measured: 64 MiB in one message 0.4 GB/s, in 16 MiB chunks 2.5).
shm copies chunk after chunk (SHM_CHUNK_BYTES), then sends one KvWrite.
write(..., layers=range(a, b)) sends only those layers, so a prefill worker can ship each
layer as soon as it has computed it.

Copies run on the event loop's thread, the loop served between chunks: numba launches
from another thread cost ~25 us more each (a 32-layer copy ran at 18 instead of 24
GB/s), and ZeroMQ and UCX move the bytes on threads of their own anyway. Each copy uses
COPY_THREADS (transport.shm) numba threads (one; see there for why).

Done: the receiver answers a KvWrite with KvWriteDone once its bytes are in place, so
when write returns every byte is in the peer's pool. That is the one completion signal:
the receiver does not wait on the data plane, it learns that a transfer is complete (or
failed) from the control-plane request that asked for it (the decode worker's
RemotePrefill is answered after the prefill worker's write returned).

Grants: a receiver takes a KvWrite only for a transfer it granted to that peer
(grant(peer, id, blocks) before asking for it, revoke after), and only into the granted
blocks; anything else is refused (PermissionError, a `forbidden` Error to the sender)
before a byte is unpacked. A shm write has already copied into the mapped pool when its
KvWrite comes: the segment is only offered (KvPoolQuery, workers only) to same-host
actors of this user, who are trusted with it; the grant still makes a write outside it
fail at its sender.

Liveness: a write awaits its KvWriteDone through channel.request, which fails when the
control plane declares the peer dead (or after `timeout`). The receiving actor calls
peer_dead(peer) when a peer dies, which cancels that peer's receives in progress (a UCX
message that will never come) and drops the link.

On an actor, by composition: DataPlaneHandlers(plane).register(actor) answers the
plane's messages (KvPoolQuery, KvWrite: actor.handle) and calls peer_dead on every
peer's death (actor.watch).
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import msgspec
import numpy as np
import structlog
import torch

from kvmesh.gpu.kv_cache import kv_caches_from_buffer
from kvmesh.gpu.kv_pack import pack_blocks, packed_shape, unpack_blocks
from kvmesh.kv.segment import SharedSegment, segment_name
from kvmesh.protocol import (
    Error,
    ErrorCode,
    KvPoolInfo,
    KvPoolQuery,
    KvWrite,
    KvWriteDone,
    Message,
    Request,
)
from kvmesh.transport import cuda_ipc, ucx
from kvmesh.transport.kv_layout import KVLayout, check_ids, check_layers
from kvmesh.transport.shm import COPY_THREADS, ShmLink, copy_blocks, numba_threads
from kvmesh.transport.staging import WINDOW, Staging
from kvmesh.transport.zmq_plane import ZmqLink, frame_bytes

log = structlog.get_logger(__name__)

BACKENDS = ("shm", "zmq", "ucx")
SETTINGS = ("auto", *BACKENDS)
CHUNK_BYTES = 16 << 20  # zmq, ucx: bytes of one KvWrite
SHM_CHUNK_BYTES = 64 << 20  # shm: bytes copied between turns of the event loop (~3 ms)


class Channel(Protocol):
    """The control plane as the data plane uses it; an Actor is one."""

    actor_id: str

    async def request(
        self, peer: str, msg: Request, timeout: float, *, frames: Sequence = ()
    ) -> Message: ...


class Registrar(Protocol):
    """What DataPlaneHandlers registers with: an Actor's handle and watch."""

    def handle(self, message_type: type[Message], handler: Callable[..., Awaitable]) -> None: ...

    def watch(self, peer: Callable[[str], bool], on_dead: Callable[[str], Awaitable]) -> object: ...


def allocate_shared_pool(
    layout: KVLayout, actor_id: str
) -> tuple[list[torch.Tensor], SharedSegment]:
    """A zeroed pool in a new shared-memory segment named for actor_id: per-layer views,
    and the segment to hand to KVDataPlane (which unlinks it on close)."""
    segment = SharedSegment.create(segment_name(actor_id), layout.pool_bytes)
    kv_caches = kv_caches_from_buffer(
        torch.from_numpy(segment.pool), layout, layout.num_blocks, layout.block_size, layout.dtype
    )
    return kv_caches, segment


class KVDataPlane:
    """One actor's end of the data plane, sender and receiver both.

    kv_caches is this actor's pool; segment, when given, is the shared-memory segment
    it lives in (allocate_shared_pool), offered to same-host senders and unlinked on
    close. backend: "auto" or a forced backend (see the module docstring).
    """

    def __init__(
        self,
        channel: Channel,
        kv_caches: list[torch.Tensor],
        *,
        segment: SharedSegment | None = None,
        backend: str = "auto",
        node: str | None = None,
        timeout: float = 60.0,
        chunk_bytes: int = CHUNK_BYTES,
        window: int = WINDOW,
        require_grants: bool = True,
    ) -> None:
        """require_grants=False takes writes from anyone (the transfer benchmark and
        tests of the bytes only)."""
        if backend not in SETTINGS:
            raise ValueError(f"backend must be one of {SETTINGS}, got {backend!r}")
        # Importing ucxx takes ~0.7 s: here, not on the event loop of a serving actor.
        has_ucx = backend in ("auto", "ucx") and ucx.available()
        if backend == "ucx" and not has_ucx:
            raise ValueError(
                f"backend 'ucx' needs ucxx, which does not import: {ucx.import_error()}"
            )
        packed_shape(kv_caches, 0)  # checks the pool, naming what is wrong
        self.channel = channel
        self.kv_caches = kv_caches
        self.layout = KVLayout.of(kv_caches)
        self.segment = segment
        self.backend = backend
        self.node = node or platform.node()
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.window = window
        self._links: dict[str, asyncio.Future] = {}
        self._receiving: dict[str, set[asyncio.Task]] = {}
        self._grants: dict[tuple[str, str], frozenset[int]] = {}
        self.require_grants = require_grants
        self.on_cpu = kv_caches[0].device.type == "cpu"
        self._staging = Staging(pin=not self.on_cpu)
        if self.layout.num_blocks and self.on_cpu:
            self._load_kernels()

    # --- sender side ---

    async def write(
        self,
        peer: str,
        transfer_id: str,
        src_block_ids: Sequence[int] | np.ndarray,
        dst_block_ids: Sequence[int] | np.ndarray,
        *,
        layers: range | None = None,
        timeout: float | None = None,
    ) -> None:
        """Write src blocks of this pool into dst blocks of peer's pool (K and V, every
        layer or those in `layers`), then tell peer; return once peer has them.

        Raises ValueError naming the field for bad ids or layers, or pools that differ;
        ConnectionError when peer dies first; TimeoutError.
        """
        timeout = self.timeout if timeout is None else timeout
        layers = check_layers(layers, self.layout.num_layers)
        src = check_ids(src_block_ids, self.layout.num_blocks, "src_block_ids")
        link, peer_layout = await self.link(peer)
        dst = check_ids(dst_block_ids, peer_layout.num_blocks, "dst_block_ids", distinct=True)
        if len(src) != len(dst):
            raise ValueError(f"src_block_ids has {len(src)} ids, dst_block_ids {len(dst)}")
        msg = KvWrite(
            transfer_id=transfer_id,
            block_ids=dst.tolist(),
            first_layer=layers.start,
            num_layers=len(layers),
            backend=link.backend,
        )
        chunk_bytes = self.chunk_bytes if link.chunked else SHM_CHUNK_BYTES
        per_chunk = max(1, chunk_bytes // max(1, self.layout.packed_bytes(len(src), 1)))
        chunks = [
            range(a, min(a + per_chunk, layers.stop))
            for a in range(layers.start, layers.stop, per_chunk)
        ]
        if not link.chunked:
            await link.write(msg, self.kv_caches, src, dst, chunks, timeout)
            return
        window = asyncio.Semaphore(self.window)
        tasks = [
            asyncio.ensure_future(self._write_chunk(link, msg, src, chunk, window, timeout))
            for chunk in chunks
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _write_chunk(self, link, msg: KvWrite, src, layers: range, window, timeout) -> None:
        async with window:
            lease = self._staging.take(self.layout.packed_bytes(len(src), len(layers)))
            try:
                if self.on_cpu:
                    with numba_threads(COPY_THREADS):
                        pack_blocks(self._layers(layers), src, lease.view)
                else:  # through host memory: ZeroMQ frames and host UCX buffers
                    lease.view.copy_(
                        pack_blocks(self._layers(layers), src).view(-1).view(torch.uint8)
                    )
                chunk = msgspec.structs.replace(
                    msg, first_layer=layers.start, num_layers=len(layers)
                )
                await link.send_packed(chunk, lease, timeout)
            finally:
                self._staging.give(lease)

    async def link(self, peer: str) -> tuple[object, KVLayout]:
        """The link to peer and peer's pool layout, made at the first call: pools
        compared, backend picked."""
        future = self._links.get(peer)
        if future is None:
            future = self._links[peer] = asyncio.ensure_future(self._connect(peer))
        try:
            return await asyncio.shield(future)
        except BaseException:
            if future.done() and self._links.get(peer) is future:
                del self._links[peer]
            raise

    async def _connect(self, peer: str) -> tuple[object, KVLayout]:
        link, layout = await self._pick(peer)
        log.info("kv_link", peer=peer, backend=link.backend)
        return link, layout

    async def _pick(self, peer: str) -> tuple[object, KVLayout]:
        wanted = [
            b for b in BACKENDS if self.backend in ("auto", b) and (b != "ucx" or ucx.available())
        ]
        # ucx is asked for only once shm is out: it makes the peer start a UCX worker.
        info = await self._query(peer, [b for b in wanted if b != "ucx"])
        layout = KVLayout.of_info(info)
        mismatch = self.layout.mismatch(layout)
        if mismatch is not None:
            raise ValueError(f"peer {peer!r} has another KV pool layout: {mismatch}")
        why = {}
        if "shm" in wanted:
            link = self._shm_link(peer, info, layout, why)
            if link is not None:
                return link, layout
        if "ucx" in wanted:
            address = (await self._query(peer, ["ucx"])).ucx_address
            if address is not None:
                link = ucx.UcxLink(
                    self.channel, peer, ucx.worker(), address, same_node=info.node == self.node
                )
                return link, layout
            why["ucx"] = "the peer offers no UCX worker address (no ucxx there?)"
        if "zmq" in wanted:
            return ZmqLink(self.channel, peer), layout
        raise ValueError(
            f"backend {self.backend!r} cannot reach peer {peer!r}: {why[self.backend]}"
        )

    async def _query(self, peer: str, backends: list[str]) -> KvPoolInfo:
        info = await self.channel.request(peer, KvPoolQuery(backends=backends), self.timeout)
        if not isinstance(info, KvPoolInfo):
            raise ConnectionError(f"{peer} answered KvPoolQuery with {type(info).__name__}")
        return info

    def _shm_link(self, peer: str, info: KvPoolInfo, layout: KVLayout, why: dict):
        """A ShmLink when peer's segment maps here (or, between CUDA pools, its CUDA IPC
        handles open here), else None with the reason in why."""
        if not self.on_cpu:
            if info.cuda_ipc is None:
                why["shm"] = "the peer offers no CUDA IPC handles (not a CUDA pool?)"
                return None
            shape = (2, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
            try:
                caches = cuda_ipc.open_handles(info.cuda_ipc, shape, layout.dtype)
            except RuntimeError as exc:
                why["shm"] = f"its CUDA IPC handles do not open here ({exc})"
                return None
            return ShmLink(self.channel, peer, None, caches)
        if info.shm_name is None:
            why["shm"] = "the peer offers no shared-memory pool"
            return None
        try:
            segment = SharedSegment.attach(info.shm_name, info.shm_token or b"", layout.pool_bytes)
        except (OSError, ValueError) as exc:
            why["shm"] = f"its segment does not map here ({exc})"
            return None
        caches = kv_caches_from_buffer(
            torch.from_numpy(segment.pool),
            layout,
            layout.num_blocks,
            layout.block_size,
            layout.dtype,
        )
        return ShmLink(self.channel, peer, segment, caches)

    # --- receiver side ---

    def pool_info(self, query: KvPoolQuery) -> KvPoolInfo:
        """This pool's layout and the ways to it the asker can use."""
        info = KvPoolInfo(
            num_layers=self.layout.num_layers,
            num_blocks=self.layout.num_blocks,
            block_size=self.layout.block_size,
            num_kv_heads=self.layout.num_kv_heads,
            head_dim=self.layout.head_dim,
            dtype=self.layout.dtype_name,
            node=self.node,
        )
        if "shm" in query.backends and self.segment is not None:
            info = msgspec.structs.replace(
                info, shm_name=self.segment.name, shm_token=self.segment.token
            )
        if "shm" in query.backends and not self.on_cpu:
            info = msgspec.structs.replace(info, cuda_ipc=cuda_ipc.export_handles(self.kv_caches))
        if "ucx" in query.backends and ucx.available():
            info = msgspec.structs.replace(info, ucx_address=ucx.worker().address)
        return info

    def grant(self, peer: str, transfer_id: str, block_ids: Sequence[int]) -> None:
        """Let peer write transfer transfer_id into these blocks of this pool."""
        self._grants[(peer, transfer_id)] = frozenset(int(i) for i in block_ids)

    def revoke(self, peer: str, transfer_id: str) -> None:
        """The transfer is over (done or failed): no more writes for it."""
        self._grants.pop((peer, transfer_id), None)

    def _check_grant(self, peer: str, transfer_id: str, ids: np.ndarray) -> None:
        if not self.require_grants:
            return
        granted = self._grants.get((peer, transfer_id))
        if granted is None:
            raise PermissionError(
                f"KvWrite of transfer {transfer_id!r} from {peer!r}: no "
                "such transfer was granted to it"
            )
        stray = sorted(set(ids.tolist()) - granted)
        if stray:
            raise PermissionError(
                f"KvWrite of transfer {transfer_id!r} from {peer!r}: blocks "
                f"{stray[:8]} were not granted to it"
            )

    async def receive(self, msg: KvWrite, peer: str, frames: list) -> KvWriteDone:
        """Handle a KvWrite from peer: put its bytes in place (zmq, ucx; shm's already
        are), then answer. Raises ValueError naming the field for a malformed one,
        PermissionError for one that was not granted."""
        layers = check_layers(
            range(msg.first_layer, msg.first_layer + msg.num_layers),
            self.layout.num_layers,
            "KvWrite layers",
        )
        ids = check_ids(msg.block_ids, self.layout.num_blocks, "KvWrite.block_ids", distinct=True)
        self._check_grant(peer, msg.transfer_id, ids)
        nbytes = self.layout.packed_bytes(len(ids), len(layers))
        if msg.backend == "shm":
            if self.segment is None and self.on_cpu:
                raise ValueError("KvWrite.backend is 'shm' but this pool is not shared")
        elif msg.backend == "zmq":
            self._unpack(frame_bytes(frames, nbytes), layers, ids)
        elif msg.backend == "ucx":
            await self._receive_ucx(peer, msg.ucx_tag, nbytes, layers, ids)
        else:
            raise ValueError(f"KvWrite.backend must be one of {BACKENDS}, got {msg.backend!r}")
        return KvWriteDone(transfer_id=msg.transfer_id)

    async def _receive_ucx(self, peer: str, tag: int, nbytes: int, layers: range, ids) -> None:
        if not ucx.available():
            raise ValueError(
                f"KvWrite.backend is 'ucx' but ucxx does not import here: {ucx.import_error()}"
            )
        lease = self._staging.take(nbytes)
        receiving = self._receiving.setdefault(peer, set())
        task = asyncio.current_task()
        receiving.add(task)  # peer_dead cancels it: a dead sender's message never comes
        try:
            if nbytes:
                await asyncio.wait_for(ucx.worker().recv(lease.view.numpy(), tag), self.timeout)
            self._unpack(lease.view, layers, ids)
        except BaseException:
            lease.never_reuse()  # UCX may still write into it
            raise
        finally:
            receiving.discard(task)
            self._staging.give(lease)

    def peer_dead(self, peer: str) -> None:
        """Stop receiving from peer, drop the link to it."""
        for task in self._receiving.pop(peer, ()):
            task.cancel()
        future = self._links.pop(peer, None)
        if future is not None:
            _close_link(future, peer_dead=True)

    async def close(self) -> None:
        """Stop every receive, drop every link, unlink the shared segment."""
        for peer in list(self._receiving):
            self.peer_dead(peer)
        for future in self._links.values():
            _close_link(future, peer_dead=False)
        self._links.clear()
        if self.segment is not None:
            self.segment.close()

    # --- helpers ---

    def _load_kernels(self) -> None:
        """Load (or compile) the numba kernels now, on this pool's array types: a first
        call takes ~0.5 s from numba's cache and seconds to compile, and on the event
        loop of a serving actor that is silence its peers take for death. Block 0 is
        copied onto itself and packed and unpacked in place: its bytes do not change."""
        block_0 = np.zeros(1, np.int64)
        copy_blocks(self.kv_caches, block_0, self.kv_caches, block_0, range(self.layout.num_layers))
        with numba_threads(COPY_THREADS):
            unpack_blocks(pack_blocks(self.kv_caches, block_0), self.kv_caches, block_0)

    def _unpack(self, packed: torch.Tensor, layers: range, ids: np.ndarray) -> None:
        if self.on_cpu:
            with numba_threads(COPY_THREADS):
                unpack_blocks(packed, self._layers(layers), ids)
        else:
            unpack_blocks(packed.to(self.kv_caches[0].device), self._layers(layers), ids)

    def _layers(self, layers: range) -> list[torch.Tensor]:
        return self.kv_caches[layers.start : layers.stop]


class DataPlaneHandlers:
    """A KVDataPlane's end on an actor: its KV handlers and what a peer's death ends.
    `register(actor)` wires them in; the actor holds the plane, this holds nothing else."""

    def __init__(self, plane: KVDataPlane) -> None:
        self.plane = plane

    def register(self, actor: Registrar) -> None:
        """Answer KvPoolQuery and KvWrite on actor; fail a dead peer's transfers."""
        actor.handle(KvPoolQuery, self.on_kv_pool_query)
        actor.handle(KvWrite, self.on_kv_write)
        actor.watch(lambda peer_id: True, self.peer_died)  # every peer

    async def on_kv_pool_query(self, msg: KvPoolQuery, inbound) -> KvPoolInfo:
        """Describe this actor's KV pool to a would-be sender."""
        return self.plane.pool_info(msg)

    async def on_kv_write(self, msg: KvWrite, inbound) -> KvWriteDone | Error:
        """Blocks of a transfer landed (or arrive now): put them in place, if granted."""
        try:
            return await self.plane.receive(msg, inbound.peer, inbound.frames)
        except PermissionError as exc:
            log.warning("kv_write_refused", peer=inbound.peer, reason=str(exc))
            return Error(code=ErrorCode.FORBIDDEN, message=str(exc))

    async def peer_died(self, peer_id: str) -> None:
        """Fail what peer_id was sending here, drop the link to it."""
        self.plane.peer_dead(peer_id)


def _close_link(future: asyncio.Future, peer_dead: bool) -> None:
    """Close the link a _connect future made, or stop the _connect."""
    if not future.done():
        future.cancel()
    elif not future.cancelled() and future.exception() is None:
        link, _ = future.result()
        link.close(peer_dead)
