"""A KV pool's layout as the data plane sees it, and the checks of what names its blocks
and layers (ids from callers and from the wire alike)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.gpu.model_config import DTYPES as MODEL_DTYPES
from kvmesh.protocol import KvPoolInfo

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}  # name -> torch dtype


@dataclass(frozen=True)
class KVLayout:
    """A KV pool's shape: num_layers tensors of [2, num_blocks, block_size, num_kv_heads,
    head_dim]. It has the fields kv_caches_from_buffer reads from a ModelConfig."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, kv_caches: list[torch.Tensor]) -> KVLayout:
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_caches[0].shape
        return cls(
            len(kv_caches), num_blocks, block_size, num_kv_heads, head_dim, kv_caches[0].dtype
        )

    @classmethod
    def of_info(cls, info: KvPoolInfo) -> KVLayout:
        if info.dtype not in DTYPES:
            raise ValueError(f"KvPoolInfo.dtype must be one of {list(DTYPES)}, got {info.dtype!r}")
        return cls(
            info.num_layers,
            info.num_blocks,
            info.block_size,
            info.num_kv_heads,
            info.head_dim,
            DTYPES[info.dtype],
        )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def packed_bytes(self, num_blocks: int, num_layers: int) -> int:
        """Bytes of num_blocks blocks (K and V) of num_layers layers."""
        return (
            2
            * num_blocks
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * num_layers
            * self.dtype.itemsize
        )

    @property
    def pool_bytes(self) -> int:
        return self.packed_bytes(self.num_blocks, self.num_layers)

    def mismatch(self, other: KVLayout) -> str | None:
        """The first field (num_blocks aside) in which two pools differ, described."""
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} is {getattr(other, name)} there, {getattr(self, name)} here"
        return None


def check_ids(ids, num_blocks: int, name: str, distinct: bool = False) -> np.ndarray:
    """ids as a checked int64 array: 1-D integers in [0, num_blocks), distinct if asked."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    array = np.asarray(ids)
    if array.size == 0:
        return np.empty(0, np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a 1-D sequence of ints, got {array.dtype} {list(array.shape)}"
        )
    array = np.ascontiguousarray(array, dtype=np.int64)
    bad = array[(array < 0) | (array >= num_blocks)]
    if bad.size:
        raise ValueError(f"{name} out of range [0, {num_blocks}): {bad[:8].tolist()}")
    if distinct and np.unique(array).size != array.size:
        values, counts = np.unique(array, return_counts=True)
        raise ValueError(f"{name} must be distinct, repeated: {values[counts > 1][:8].tolist()}")
    return array


def check_layers(layers: range | None, num_layers: int, name: str = "layers") -> range:
    if layers is None:
        return range(num_layers)
    if (
        not isinstance(layers, range)
        or layers.step != 1
        or layers.start < 0
        or layers.stop > num_layers
        or len(layers) == 0
    ):
        raise ValueError(
            f"{name} must be a non-empty range(a, b) within [0, {num_layers}), got {layers!r}"
        )
    return layers
