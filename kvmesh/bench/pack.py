"""Pack/unpack bandwidth of the KV block-packing backends against a plain memcpy of the
same bytes, measured in the same run.

The pool has the geometry of a Llama-3-8B layer group (32 layers, block_size 16, 8 KV
heads, head_dim 128, bfloat16 by default) and about `nbytes` of blocks. Pack gathers every
block of it in a random order, so the packed buffer is the same size as the pool and
memcpy copies exactly those bytes (pool → packed buffer). Unpack scatters the packed
buffer back into the pool under another random order. Each figure is the best of
`repeats` timed runs after one untimed run (numba compiles, pages fault in), in GB/s of
packed bytes (1 GB = 1e9 bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from kvmesh.gpu.kv_pack import pack_blocks, unpack_blocks


def measure_pack(
    nbytes: int,
    backends: list[str],
    *,
    num_layers: int = 32,
    block_size: int = 16,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    one_allocation: bool = False,
    repeats: int = 5,
) -> dict:
    """{"nbytes", "memcpy_gbps", "pack_gbps": {backend: x}, "unpack_gbps": {backend: x}}.

    one_allocation=True makes the pool one [num_layers, 2, ...] tensor handed out as
    per-layer views, which the kernels copy in a single launch; False gives each layer
    its own tensor, as most engines allocate it.
    """
    layer_block_bytes = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize
    num_blocks = max(1, nbytes // (num_layers * layer_block_bytes))
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if one_allocation:
        kv_caches = list(torch.ones((num_layers, *shape), dtype=dtype, device=device))
    else:
        kv_caches = [torch.ones(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    rng = np.random.default_rng(0)
    pack_ids = rng.permutation(num_blocks)
    unpack_ids = rng.permutation(num_blocks)
    packed = pack_blocks(kv_caches, pack_ids, backend="torch")
    packed_bytes = packed.numel() * packed.element_size()

    def gbps(run: Callable[[], object]) -> float:
        return packed_bytes / _best_seconds(run, repeats, device) / 1e9

    return {
        "nbytes": packed_bytes,
        "memcpy_gbps": gbps(_memcpy(kv_caches, packed)),
        "pack_gbps": {
            b: gbps(lambda b=b: pack_blocks(kv_caches, pack_ids, out=packed, backend=b))
            for b in backends
        },
        "unpack_gbps": {
            b: gbps(lambda b=b: unpack_blocks(packed, kv_caches, unpack_ids, backend=b))
            for b in backends
        },
    }


def _memcpy(kv_caches: list[torch.Tensor], packed: torch.Tensor) -> Callable[[], None]:
    """A copy of the pool's bytes into the packed buffer: np.copyto on CPU, copy_ on CUDA."""
    layers = packed.unbind(0)
    if packed.device.type != "cpu":
        return lambda: [
            dst.view(-1).copy_(src.view(-1)) for src, dst in zip(kv_caches, layers, strict=True)
        ]
    pairs = [(_bytes(dst), _bytes(src)) for src, dst in zip(kv_caches, layers, strict=True)]
    return lambda: [np.copyto(dst, src) for dst, src in pairs]


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(-1).view(torch.uint8).numpy()


def _best_seconds(run: Callable[[], object], repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    run()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
