"""The Numba paged decode kernel, specialized per (head_dim, group), against dense
attention over the same context gathered from the pool."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvmesh.gpu.cpu_attention import KERNEL_SOURCE, decode_kernel, paged_decode_attention

BLOCK_SIZE = 16


def make_pool(num_blocks: int, num_kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=g)


def dense_reference(q, pool, tables, ctx_lens, scale):
    """Each sequence's context gathered in order, then plain softmax attention."""
    num_heads, num_kv_heads = q.shape[1], pool.shape[3]
    outs = []
    for row, ctx_len in enumerate(ctx_lens):
        pos = torch.arange(int(ctx_len))
        blocks = torch.from_numpy(tables[row])[pos // BLOCK_SIZE]
        keys = pool[0][blocks, pos % BLOCK_SIZE]  # [ctx, kvh, hd]
        values = pool[1][blocks, pos % BLOCK_SIZE]
        out = F.scaled_dot_product_attention(
            q[row].unsqueeze(1),  # [heads, 1, hd]
            keys.transpose(0, 1),
            values.transpose(0, 1),
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        outs.append(out.squeeze(1))
    return torch.stack(outs)


@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads"),
    [(64, 9, 3), (16, 4, 4), (32, 8, 2)],
    ids=["smollm2-64x3", "mha-16x1", "gqa-32x4"],
)
def test_kernel_equals_dense_attention(head_dim, num_heads, num_kv_heads):
    ctx_lens = np.array([1, 17, 40, 16], np.int64)  # one token, block edges, partial blocks
    num_blocks = 16
    pool = make_pool(num_blocks, num_kv_heads, head_dim, seed=head_dim)
    rng = np.random.default_rng(head_dim)
    tables = rng.permutation(np.arange(1, num_blocks))[: 4 * 3].reshape(4, 3).astype(np.int64)
    q = torch.randn(4, num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    got = paged_decode_attention(q, pool, tables, ctx_lens, scale)
    expected = dense_reference(q, pool, tables, ctx_lens, scale)
    assert got.shape == (4, num_heads, head_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_each_specialization_is_one_module_with_its_shapes():
    kernel = decode_kernel(64, 3)
    assert decode_kernel(64, 3) is kernel  # compiled once per process
    source = KERNEL_SOURCE.format(head_dim=64, group=3)
    assert "HEAD_DIM = 64\nGROUP = 3\n" in source
    assert open(kernel.py_func.__code__.co_filename).read() == source
