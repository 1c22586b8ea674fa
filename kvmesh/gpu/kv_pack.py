"""KV block packing: gather a request's blocks from every layer of a KV pool into one
contiguous buffer (pack), and scatter such a buffer into another pool's blocks (unpack).

A pool is one tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = K, 1 = V). The packed buffer is layer-major, [num_layers, 2, n, block_size,
num_kv_heads, head_dim], so packed[l] is contiguous: a sender may ship layer l as soon as
pack_layer has written it, and a receiver may unpack_layer it on arrival.

Every layer is copied as rows of one block each (block_elems = block_size * heads * dim):

    pool layer l, [2 * num_blocks, block_elems]         packed[l], [2 * n, block_elems]
    row kv * num_blocks + b                              row kv * n + i

             b=0  1   2   3   4                               i=0  1   2
    kv=0 K [  .   A   .   B   C  ]     block_ids=[3, 1, 4]   K [  B   A   C  ]
    kv=1 V [  .   a   .   b   c  ]   ─────────────────────►  V [  b   a   c  ]

When the layers are one allocation ([num_layers, 2, num_blocks, ...], handed out as
pool[l]) the rows of layer l+1 follow those of layer l, so one view of R = 2 * num_layers
row groups serves all layers in one kernel launch; otherwise each layer is its own group
of R = 2. Either way, within a group:

    packed row t  ◄──  pool row (t // n) * num_blocks + block_ids[t % n]

Backends, picked once per call ("auto": numba on CPU, cupy on CUDA when installed, else
torch): numba copies rows as the widest integer word the row size and addresses allow
(it has no float16/bfloat16, and wider words copy faster); torch uses index_select /
index_copy_; cupy launches one RawKernel per group, one CUDA thread block per row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numba import njit, prange

PACK_BACKENDS = ("numba", "torch", "cupy")
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

BlockIds = Sequence[int] | np.ndarray | torch.Tensor
# (pool or packed row groups, packed or pool row groups, block ids, num_blocks)
Copy = Callable[[list[torch.Tensor], list[torch.Tensor], np.ndarray, int], None]


def packed_shape(kv_caches: list[torch.Tensor], num_blocks_packed: int) -> tuple[int, ...]:
    """Shape of pack_blocks' output: [num_layers, 2, n, block_size, num_kv_heads, head_dim]."""
    check_caches(kv_caches, "kv_caches")
    if (
        isinstance(num_blocks_packed, bool)
        or not isinstance(num_blocks_packed, int)
        or num_blocks_packed < 0
    ):
        raise ValueError(f"num_blocks_packed must be an int >= 0, got {num_blocks_packed!r}")
    return _packed_shape(kv_caches, num_blocks_packed)


def pack_blocks(
    kv_caches: list[torch.Tensor],
    block_ids: BlockIds,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gather block_ids (repeats allowed) from every layer into one layer-major buffer.

    out, when given, is written in place: either a tensor of packed_shape and the pool's
    dtype, or a flat uint8 buffer of exactly that many bytes (a shared-memory or
    registered transport buffer). Returns the packed view, in the pool's dtype.
    """
    first = check_caches(kv_caches, "kv_caches")
    ids = _as_block_ids(block_ids, first.shape[1])
    packed = _as_buffer(out, _packed_shape(kv_caches, len(ids)), first, "out")
    gather, _ = _resolve(backend, first.device)
    if len(ids):
        pool_rows = _row_groups(kv_caches)
        gather(pool_rows, _packed_groups(packed, len(pool_rows)), ids, first.shape[1])
    return packed


def unpack_blocks(
    packed: torch.Tensor,
    kv_caches: list[torch.Tensor],
    block_ids: BlockIds,
    backend: str = "auto",
) -> None:
    """Scatter a pack_blocks buffer into block_ids (distinct) of every layer of kv_caches.

    packed is a tensor of packed_shape in the pool's dtype, or a flat uint8 buffer of that
    many bytes. Blocks not in block_ids are left untouched.
    """
    first = check_caches(kv_caches, "kv_caches")
    ids = _as_block_ids(block_ids, first.shape[1], distinct=True)
    packed = _as_buffer(packed, _packed_shape(kv_caches, len(ids)), first, "packed")
    _, scatter = _resolve(backend, first.device)
    if len(ids):
        pool_rows = _row_groups(kv_caches)
        scatter(_packed_groups(packed, len(pool_rows)), pool_rows, ids, first.shape[1])


def unpack_records(
    records: torch.Tensor,
    kv_caches: list[torch.Tensor],
    block_ids: BlockIds,
    backend: str = "auto",
) -> None:
    """unpack_blocks for n blocks packed one at a time (pack_blocks(kv_caches, [b]) each,
    e.g. host-tier records) and laid back to back: [n, num_layers, 2, 1, block_size,
    num_kv_heads, head_dim] in the pool's dtype, or a flat uint8 buffer of that many bytes.

    One reorder into pack_blocks' layer-major layout (a copy on records' device, none
    for n = 1), then one unpack_blocks, instead of n launches.
    """
    first = check_caches(kv_caches, "kv_caches")
    ids = _as_block_ids(block_ids, first.shape[1], distinct=True)
    records = _as_buffer(records, (len(ids), *_packed_shape(kv_caches, 1)), first, "records")
    unpack_blocks(records.squeeze(3).movedim(0, 2).contiguous(), kv_caches, ids, backend)


def pack_layer(
    kv_cache: torch.Tensor,
    block_ids: BlockIds,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """pack_blocks for one layer: returns [2, n, block_size, num_kv_heads, head_dim], the
    same bytes as pack_blocks(kv_caches, block_ids)[l]."""
    check_caches([kv_cache], "kv_cache")
    ids = _as_block_ids(block_ids, kv_cache.shape[1])
    packed = _as_buffer(out, (2, len(ids), *kv_cache.shape[2:]), kv_cache, "out")
    gather, _ = _resolve(backend, kv_cache.device)
    if len(ids):
        gather([_rows(kv_cache)], [_rows(packed)], ids, kv_cache.shape[1])
    return packed


def unpack_layer(
    packed: torch.Tensor,
    kv_cache: torch.Tensor,
    block_ids: BlockIds,
    backend: str = "auto",
) -> None:
    """unpack_blocks for one layer: packed is [2, n, block_size, num_kv_heads, head_dim]
    (or its bytes), as pack_layer writes it."""
    check_caches([kv_cache], "kv_cache")
    ids = _as_block_ids(block_ids, kv_cache.shape[1], distinct=True)
    packed = _as_buffer(packed, (2, len(ids), *kv_cache.shape[2:]), kv_cache, "packed")
    _, scatter = _resolve(backend, kv_cache.device)
    if len(ids):
        scatter([_rows(packed)], [_rows(kv_cache)], ids, kv_cache.shape[1])


def available_backends(device: torch.device | str) -> tuple[str, ...]:
    """The backends that can run on tensors of this device, in PACK_BACKENDS order."""
    kind = torch.device(device).type
    if kind == "cpu":
        return ("numba", "torch")
    if kind == "cuda" and _cupy() is not None:
        return ("torch", "cupy")
    return ("torch",)


# ---- argument checks ---------------------------------------------------------------


def check_caches(kv_caches: list[torch.Tensor], name: str) -> torch.Tensor:
    """kv_caches[0], once every layer is checked to be a contiguous [2, num_blocks,
    block_size, num_kv_heads, head_dim] tensor of a KV dtype, all alike; else ValueError
    naming `name`. Public for the other block copies (transport.shm.copy_blocks)."""
    if not isinstance(kv_caches, (list, tuple)) or not kv_caches:
        raise ValueError(f"{name} must be a non-empty list of tensors, got {kv_caches!r:.80}")
    first = kv_caches[0]
    spec = None
    for layer, cache in enumerate(kv_caches):
        where = name if name == "kv_cache" else f"{name}[{layer}]"
        if not isinstance(cache, torch.Tensor):
            raise ValueError(f"{where} must be a torch.Tensor, got {type(cache).__name__}")
        if spec is None:  # layer 0 alone: the others must equal it
            if cache.dim() != 5 or cache.shape[0] != 2:
                raise ValueError(
                    f"{where} must have shape [2, num_blocks, block_size, num_kv_heads, "
                    f"head_dim], got {list(cache.shape)}"
                )
            if cache.dtype not in KV_DTYPES:
                raise ValueError(f"{where}.dtype must be one of {KV_DTYPES}, got {cache.dtype}")
            spec = (cache.shape, cache.dtype, cache.device)
        elif (cache.shape, cache.dtype, cache.device) != spec:
            raise ValueError(
                f"{where} is {list(cache.shape)} {cache.dtype} on {cache.device}; every "
                f"layer must match {name}[0]: {list(first.shape)} {first.dtype} on "
                f"{first.device}"
            )
        if not cache.is_contiguous():
            raise ValueError(f"{where} must be contiguous")
    return first


def _as_block_ids(block_ids: BlockIds, num_blocks: int, distinct: bool = False) -> np.ndarray:
    """block_ids as a contiguous int64 host array, each in [0, num_blocks)."""
    if isinstance(block_ids, torch.Tensor):
        block_ids = block_ids.detach().cpu().numpy()  # a CUDA tensor costs a sync here
    ids = np.asarray(block_ids)
    if ids.ndim != 1:
        raise ValueError(f"block_ids must be 1-D, got shape {list(ids.shape)}")
    if ids.size == 0:
        return np.empty(0, np.int64)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be integers, got dtype {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= num_blocks)]
    if bad.size:
        raise ValueError(f"block_ids out of range [0, {num_blocks}): {bad[:8].tolist()}")
    if distinct:
        values, counts = np.unique(ids, return_counts=True)
        if values.size != ids.size:
            raise ValueError(
                f"block_ids must be distinct to unpack, repeated: {values[counts > 1][:8].tolist()}"
            )
    return ids


def _as_buffer(
    buffer: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, name: str
) -> torch.Tensor:
    """buffer viewed as `shape` in like's dtype: a new tensor when None, else a typed
    tensor of that shape or a flat uint8 tensor of that many bytes."""
    if buffer is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    nbytes = math.prod(shape) * like.element_size()
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(buffer).__name__}")
    if buffer.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the pool, got {buffer.device}")
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if buffer.dtype == torch.uint8 and buffer.dim() == 1:
        if buffer.numel() != nbytes:
            raise ValueError(f"{name} must hold exactly {nbytes} bytes, got {buffer.numel()}")
        if buffer.data_ptr() % like.element_size() or buffer.storage_offset() % like.element_size():
            raise ValueError(f"{name} must be aligned to {like.element_size()} bytes")
        return buffer.view(like.dtype).view(shape)
    if buffer.dtype != like.dtype or tuple(buffer.shape) != shape:
        raise ValueError(
            f"{name} must be {list(shape)} {like.dtype} or a flat uint8 tensor of {nbytes} "
            f"bytes, got {list(buffer.shape)} {buffer.dtype}"
        )
    return buffer


def _resolve(backend: str, device: torch.device) -> tuple[Copy, Copy]:
    """(gather, scatter) of the backend, decided once per call."""
    allowed = available_backends(device)
    if backend == "auto":
        backend = {"cpu": "numba", "cuda": allowed[-1]}.get(device.type, "torch")
    if backend not in allowed:
        raise ValueError(
            f"backend must be 'auto' or one of {allowed} for {device.type} tensors "
            f"(all backends: {PACK_BACKENDS}), got {backend!r}"
        )
    return _COPIES[backend]


def _packed_shape(kv_caches: list[torch.Tensor], n: int) -> tuple[int, ...]:
    return (len(kv_caches), 2, n, *kv_caches[0].shape[2:])


# ---- row views -----------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[2 * num_blocks, block_elems]: one row per (kv, block) of a layer."""
    return t.view(t.shape[0] * t.shape[1], -1)


def _row_groups(kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Row views covering the layers in order: one view of all of them when they lie back
    to back in one allocation, else one view per layer."""
    first = kv_caches[0]
    layer_bytes = first.numel() * first.element_size()
    start = first.data_ptr()
    back_to_back = len(kv_caches) > 1 and all(
        cache.data_ptr() == start + layer * layer_bytes for layer, cache in enumerate(kv_caches)
    )
    # Separate allocations can be adjacent (CUDA's caching allocator carves them from one
    # segment): only a view of first's own storage may span them.
    storage = first.untyped_storage()
    end = start + len(kv_caches) * layer_bytes
    if back_to_back and storage.data_ptr() + storage.nbytes() >= end:
        block_elems = first[0, 0].numel()
        num_rows = len(kv_caches) * 2 * first.shape[1]
        return [torch.as_strided(first, (num_rows, block_elems), (block_elems, 1))]
    return [_rows(cache) for cache in kv_caches]


def _packed_groups(packed: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """packed's rows split to match _row_groups: num_groups equal, contiguous parts."""
    block_elems = math.prod(packed.shape[3:])
    return list(packed.view(num_groups, -1, block_elems).unbind(0))


def _word_bytes(tensors: list[torch.Tensor], widest: int) -> int:
    """The widest word (<= widest bytes) that divides every row and every start address."""
    word = widest
    for t in tensors:
        row_bytes = t.shape[-1] * t.element_size()
        word = math.gcd(word, row_bytes, t.data_ptr(), t.storage_offset() * t.element_size())
    return word


_INT_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def as_words(srcs: list[torch.Tensor], dsts: list[torch.Tensor]):
    """The row views reinterpreted as the widest integer word that fits all of them:
    numba has no float16/bfloat16, and both numba and torch copy wider words faster.
    Public for the other block copies (transport.shm.copy_blocks)."""
    word = _INT_WORDS[_word_bytes(srcs + dsts, widest=8)]
    return [t.view(word) for t in srcs], [t.view(word) for t in dsts]


# ---- numba (CPU) ---------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _gather_rows(src, dst, block_ids, num_blocks):  # pragma: no cover - compiled
    n = block_ids.shape[0]
    width = dst.shape[1]
    for t in prange(dst.shape[0]):
        s = (t // n) * num_blocks + block_ids[t % n]
        for j in range(width):
            dst[t, j] = src[s, j]


@njit(parallel=True, cache=True, nogil=True)
def _scatter_rows(src, dst, block_ids, num_blocks):  # pragma: no cover - compiled
    n = block_ids.shape[0]
    width = src.shape[1]
    for t in prange(src.shape[0]):
        d = (t // n) * num_blocks + block_ids[t % n]
        for j in range(width):
            dst[d, j] = src[t, j]


def _numba_copy(kernel) -> Copy:
    def copy(srcs, dsts, block_ids, num_blocks):
        for src, dst in zip(*as_words(srcs, dsts), strict=True):
            kernel(src.numpy(), dst.numpy(), block_ids, num_blocks)

    return copy


# ---- torch (any device) --------------------------------------------------------------


def _row_index(rows: torch.Tensor, block_ids: np.ndarray, num_blocks: int) -> torch.Tensor:
    """Pool row of every packed row of a group (see the module docstring)."""
    n = len(block_ids)
    ids = torch.from_numpy(block_ids).to(rows.device)
    groups = torch.arange(rows.shape[0] // n, device=rows.device).unsqueeze(1)
    return (groups * num_blocks + ids).view(-1)


def _torch_gather(pool_rows, packed_rows, block_ids, num_blocks):
    index = _row_index(packed_rows[0], block_ids, num_blocks)
    for src, dst in zip(*as_words(pool_rows, packed_rows), strict=True):
        torch.index_select(src, 0, index, out=dst)


def _torch_scatter(packed_rows, pool_rows, block_ids, num_blocks):
    index = _row_index(packed_rows[0], block_ids, num_blocks)
    for src, dst in zip(*as_words(packed_rows, pool_rows), strict=True):
        dst.index_copy_(0, index, src)


# ---- cupy (CUDA) ---------------------------------------------------------------------

_CUDA_WORDS = {
    16: "uint4",
    8: "unsigned long long",
    4: "unsigned int",
    2: "unsigned short",
    1: "unsigned char",
}
_CUDA_SOURCE = r"""
typedef WORD word_t;

extern "C" __global__ void kv_gather(const word_t* __restrict__ src, word_t* __restrict__ dst,
        const long long* __restrict__ block_ids, long long n, long long num_blocks,
        long long row_words) {
    const long long t = blockIdx.x;
    const long long s = (t / n) * num_blocks + block_ids[t % n];
    const word_t* from = src + s * row_words;
    word_t* to = dst + t * row_words;
    for (long long j = threadIdx.x; j < row_words; j += blockDim.x) to[j] = from[j];
}

extern "C" __global__ void kv_scatter(const word_t* __restrict__ src, word_t* __restrict__ dst,
        const long long* __restrict__ block_ids, long long n, long long num_blocks,
        long long row_words) {
    const long long t = blockIdx.x;
    const long long d = (t / n) * num_blocks + block_ids[t % n];
    const word_t* from = src + t * row_words;
    word_t* to = dst + d * row_words;
    for (long long j = threadIdx.x; j < row_words; j += blockDim.x) to[j] = from[j];
}
"""


@functools.cache
def _cupy():
    """The cupy module, or None when it is not installed (checked once)."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.cache
def _cuda_module(word_bytes: int):
    return _cupy().RawModule(code=_CUDA_SOURCE.replace("WORD", _CUDA_WORDS[word_bytes]))


def _cupy_copy(name: str, packed_is_src: bool) -> Copy:
    def copy(srcs, dsts, block_ids, num_blocks):
        cupy = _cupy()
        device = srcs[0].device
        word = _word_bytes(srcs + dsts, widest=16)
        ids = torch.from_numpy(block_ids).to(device)
        row_words = srcs[0].shape[1] * srcs[0].element_size() // word
        threads = min(256, -(-row_words // 32) * 32)
        # Launch on torch's current stream so the copy is ordered with the model's
        # kernels and with the caching allocator's reuse of `ids`.
        stream = torch.cuda.current_stream(device).cuda_stream
        with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream):
            kernel = _cuda_module(word).get_function(name)  # loads into this device's context
            for src, dst in zip(srcs, dsts, strict=True):
                packed = src if packed_is_src else dst
                args = (
                    np.uint64(src.data_ptr()),
                    np.uint64(dst.data_ptr()),
                    np.uint64(ids.data_ptr()),
                    np.int64(len(block_ids)),
                    np.int64(num_blocks),
                    np.int64(row_words),
                )
                kernel((packed.shape[0],), (threads,), args)

    return copy


_COPIES: dict[str, tuple[Copy, Copy]] = {
    "numba": (_numba_copy(_gather_rows), _numba_copy(_scatter_rows)),
    "torch": (_torch_gather, _torch_scatter),
    "cupy": (_cupy_copy("kv_gather", False), _cupy_copy("kv_scatter", True)),
}
