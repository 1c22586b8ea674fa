"""The KV pool's tensors: one per layer, [2, num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

import math
import os

import numpy as np
import structlog
import torch

from kvmesh.gpu.model_config import ModelConfig

log = structlog.get_logger(__name__)

# Share of free memory the pool may take when num_blocks is not given. On CPU the
# pool shares RAM with everything else on the node, so it takes less.
CUDA_MEMORY_FRACTION = 0.85
CPU_MEMORY_FRACTION = 0.25
# A CPU worker's pool when cluster.toml leaves kv.device_blocks at 0 (auto): fixed, since
# a node's CPU workers share its RAM (their pools live in /dev/shm) with each other and
# with everything else; 128 MiB per worker for the tiny model.
CPU_AUTO_BLOCKS = 4096


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """One layer's pool: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]."""
    return (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)


def kv_caches_from_buffer(
    buffer: torch.Tensor, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Per-layer pools viewing one flat byte buffer (e.g. shared memory), layer after layer."""
    shape = kv_cache_shape(config, num_blocks, block_size)
    layer_bytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    need = layer_bytes * config.num_layers
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < need:
        raise ValueError(f"buffer must be a flat uint8 tensor of at least {need} bytes")
    return [
        buffer[i * layer_bytes : (i + 1) * layer_bytes].view(dtype).view(shape)
        for i in range(config.num_layers)
    ]


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> list[torch.Tensor]:
    """Zeroed pools (zeros, not empty: padded attention reads never-written slots, and a
    NaN there would poison the masked softmax-weighted sum).

    On CPU the memory comes from numpy's calloc, whose large blocks are fresh zero
    pages from the OS: a big pool costs nothing until its blocks are first written.
    """
    shape = kv_cache_shape(config, num_blocks, block_size)
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size() * config.num_layers
    return kv_caches_from_buffer(
        torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)), config, num_blocks, block_size, dtype
    )


def available_memory(device: str) -> int:
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_MEMORY_FRACTION)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * CPU_MEMORY_FRACTION)


def configured_num_blocks(device_blocks: int, device: str) -> int | None:
    """A worker's pool size from cluster.toml's kv.device_blocks: the count given; for 0
    (auto), CPU_AUTO_BLOCKS on "cpu" and None on "cuda:N", where the worker sizes its pool
    from the GPU's free memory (default_num_blocks)."""
    if device_blocks:
        return device_blocks
    return CPU_AUTO_BLOCKS if device == "cpu" else None


def default_num_blocks(
    config: ModelConfig, block_size: int, dtype: torch.dtype, device: str, max_tokens: int
) -> int:
    """Blocks that fit the device's free memory, capped at what `max_tokens` can use."""
    block_bytes = config.kv_bytes_per_block(
        block_size, torch.tensor([], dtype=dtype).element_size()
    )
    fit = available_memory(device) // block_bytes
    useful = -(-max_tokens // block_size)
    num_blocks = int(min(fit, useful))
    if num_blocks < 1:
        raise ValueError(f"no memory left on {device} for even one KV block of {block_bytes} bytes")
    log.info("kv_pool_sized", num_blocks=num_blocks, block_bytes=block_bytes, device=device)
    return num_blocks
