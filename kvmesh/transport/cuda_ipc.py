"""Same-host KV transfer between CUDA pools: the "shm" backend when pools live on GPUs.

The receiver exports a CUDA IPC handle per layer in its KvPoolInfo (what torch's own
multiprocessing reductions send: UntypedStorage._share_cuda_); a sender on the same host
opens them (cached per storage, so a one-allocation pool is opened once) and copies its
source blocks straight into the destination blocks with device kernels, then waits for
its stream before KvWrite goes out, so the receiver never reads blocks still in flight.

Device indices are the exporter's: both processes must see the GPUs alike (the same
CUDA_VISIBLE_DEVICES), as torch.multiprocessing assumes too. Opening fails when the
peer is on another host or GPU set; the plane then falls back to ucx or zmq.
"""

from __future__ import annotations

import torch

from kvmesh.protocol import CudaIpcHandle


def export_handles(kv_caches: list[torch.Tensor]) -> list[CudaIpcHandle]:
    """One handle per layer of a CUDA pool, for KvPoolInfo.cuda_ipc."""
    handles = []
    for cache in kv_caches:
        (
            device,
            handle,
            size_bytes,
            offset_bytes,
            ref_counter_handle,
            ref_counter_offset,
            event_handle,
            event_sync_required,
        ) = cache.untyped_storage()._share_cuda_()
        handles.append(
            CudaIpcHandle(
                device=device,
                handle=handle,
                size_bytes=size_bytes,
                offset_bytes=offset_bytes,
                ref_counter_handle=ref_counter_handle,
                ref_counter_offset=ref_counter_offset,
                event_handle=event_handle,
                event_sync_required=event_sync_required,
                element_offset=cache.storage_offset(),
            )
        )
    return handles


def open_handles(
    handles: list[CudaIpcHandle], shape: tuple[int, ...], dtype: torch.dtype
) -> list[torch.Tensor]:
    """The peer's per-layer pools, [2, num_blocks, ...] views of its opened storages.
    Raises RuntimeError when the handles cannot be opened in this process."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device in this process")
    storages: dict[tuple[bytes, int], torch.UntypedStorage] = {}
    caches = []
    for h in handles:
        key = (h.handle, h.offset_bytes)
        if key not in storages:
            storages[key] = torch.UntypedStorage._new_shared_cuda(
                h.device,
                h.handle,
                h.size_bytes,
                h.offset_bytes,
                h.ref_counter_handle,
                h.ref_counter_offset,
                h.event_handle,
                h.event_sync_required,
            )
        cache = torch.empty((0,), dtype=dtype, device=f"cuda:{h.device}")
        cache.set_(storages[key], h.element_offset, shape)
        caches.append(cache)
    return caches
