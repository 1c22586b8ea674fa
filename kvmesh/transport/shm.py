"""Same-host KV transfer: the receiver's pool lives in a POSIX shared-memory segment
(kvmesh.kv.segment); a sender maps it and copies its source blocks straight into
the destination blocks (one copy in all, no staging buffer).

One segment per receiving actor, its pool laid out layer after layer:

    0            HEADER_BYTES                                      HEADER_BYTES + pool
    [magic|token][ layer 0 | layer 1 | ... | layer L-1 ]
                   each [2, num_blocks, block_size, num_kv_heads, head_dim]

The segment's name and token travel in KvPoolInfo; cleanup, the token check and the
space reservation are kvmesh.kv.segment's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba import njit, prange

from kvmesh.gpu.kv_pack import as_words, check_caches
from kvmesh.kv.segment import SharedSegment

# numba threads per data plane copy. One: a parallel copy waits at its barrier for every
# thread, and on a busy host (the engine, ZeroMQ and UCX threads, other actors) a
# descheduled one stalls it: measured on 2 cores next to one busy process, a 64 MiB
# copy's median fell from 18 GB/s (1 thread) to 9.5, its worst to 0.6 (2 threads).
# Quiet, one thread copies at 0.85-0.9x np.copyto (itself one thread).
COPY_THREADS = 1


class ShmLink:
    """Writes to one peer on this host: copies straight into its mapped pool (a shared
    segment, or CUDA IPC-opened storages), then sends KvWrite (the blocks are already in
    place when it arrives)."""

    backend = "shm"
    chunked = False

    def __init__(self, channel, peer: str, segment: SharedSegment | None, peer_caches) -> None:
        self.channel = channel
        self.peer = peer
        self.segment = segment
        self.peer_caches = peer_caches

    async def write(self, msg, kv_caches, src_ids, dst_ids, chunks: list[range], timeout):
        """Copy chunk after chunk of layers (serving the event loop in between), then
        send msg; return once the peer answered KvWriteDone."""
        peer_caches = self.peer_caches  # close() may come between chunks; these views
        for i, layers in enumerate(chunks):  # keep the mapping alive till the end
            if i:
                await asyncio.sleep(0)
            copy_blocks(kv_caches, src_ids, peer_caches, dst_ids, layers)
        if peer_caches[0].is_cuda:  # the peer may read them once KvWrite arrives
            torch.cuda.current_stream(peer_caches[0].device).synchronize()
        await self.channel.request(self.peer, msg, timeout)

    def close(self, peer_dead: bool) -> None:
        """Unmap the peer's pool (once no write still holds views of it)."""
        self.peer_caches = None
        if self.segment is not None:
            self.segment.close()


# ---- block-to-block copy ---------------------------------------------------------------


def copy_blocks(
    src_caches: list[torch.Tensor],
    src_block_ids: np.ndarray,
    dst_caches: list[torch.Tensor],
    dst_block_ids: np.ndarray,
    layers: range,
) -> None:
    """dst block dst_block_ids[i] := src block src_block_ids[i], K and V, in `layers`.

    Both pools have equal layouts but for num_blocks; ids are checked int64 arrays
    (distinct in dst). One pass, no staging buffer:

        src layer l, row kv * src_nb + src_ids[i]  ──►  dst layer l, row kv * dst_nb + dst_ids[i]

    When both pools lie layer after layer in one allocation, all the layers' rows form
    one group (G = 2 * len(layers) row blocks) and one kernel launch copies them.
    """
    check_caches(src_caches, "src_caches")
    check_caches(dst_caches, "dst_caches")
    if len(src_block_ids) == 0 or len(layers) == 0:
        return
    srcs = _row_groups(src_caches, layers)
    dsts = _row_groups(dst_caches, layers)
    if len(srcs) != len(dsts):  # one side is one allocation, the other is not
        srcs = _row_groups(src_caches, layers, per_layer=True)
        dsts = _row_groups(dst_caches, layers, per_layer=True)
    src_nb, dst_nb = src_caches[0].shape[1], dst_caches[0].shape[1]
    if src_caches[0].device.type == "cpu":
        srcs, dsts = as_words(srcs, dsts)
        with numba_threads(COPY_THREADS):
            for src, dst in zip(srcs, dsts, strict=True):
                _copy_rows(src.numpy(), dst.numpy(), src_block_ids, dst_block_ids, src_nb, dst_nb)
        return
    for src, dst in zip(srcs, dsts, strict=True):  # CUDA (IPC-opened pools): index kernels
        dst.index_copy_(
            0,
            _rows(dst_block_ids, dst_nb, dst),
            src.index_select(0, _rows(src_block_ids, src_nb, src)).to(dst.device),
        )


def _rows(block_ids: np.ndarray, num_blocks: int, rows: torch.Tensor) -> torch.Tensor:
    """Row of every (group, block) of a [G * num_blocks, block_elems] view, group-major."""
    groups = torch.arange(rows.shape[0] // num_blocks, device=rows.device).unsqueeze(1)
    return (groups * num_blocks + torch.from_numpy(block_ids).to(rows.device)).view(-1)


@contextlib.contextmanager
def numba_threads(n: int) -> Iterator[None]:
    """At most n numba threads for the parallel launches of this thread, inside."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _row_groups(
    kv_caches: list[torch.Tensor], layers: range, per_layer: bool = False
) -> list[torch.Tensor]:
    """[rows, block_elems] views of `layers`: one spanning them all when the layers lie
    back to back in one storage (and not per_layer), else one per layer."""
    first = kv_caches[layers.start]
    block_elems = first[0, 0].numel()
    rows_per_layer = 2 * first.shape[1]
    layer_bytes = first.numel() * first.element_size()
    start = first.data_ptr()
    storage = first.untyped_storage()
    spans = (
        not per_layer
        and all(
            kv_caches[layer].data_ptr() == start + i * layer_bytes for i, layer in enumerate(layers)
        )
        and storage.data_ptr() + storage.nbytes() >= start + len(layers) * layer_bytes
    )
    if spans:
        rows = len(layers) * rows_per_layer
        return [torch.as_strided(first, (rows, block_elems), (block_elems, 1))]
    return [kv_caches[layer].view(rows_per_layer, block_elems) for layer in layers]


@njit(parallel=True, cache=True, nogil=True)
def _copy_rows(src, dst, src_ids, dst_ids, src_nb, dst_nb):  # pragma: no cover - compiled
    n = src_ids.shape[0]
    width = src.shape[1]
    num_groups = src.shape[0] // src_nb
    for t in prange(num_groups * n):
        g = t // n
        i = t - g * n
        s = g * src_nb + src_ids[i]
        d = g * dst_nb + dst_ids[i]
        for j in range(width):
            dst[d, j] = src[s, j]
