"""Paged decode attention for float32 KV pools on CPU, as a Numba kernel.

The torch path gathers every decode's context into a padded [B, max_ctx] copy before
attention: three passes over the KV bytes plus the padding. This kernel walks each
sequence's block table in place and reads each K/V row once, one (sequence, KV head)
pair per parallel job:

    for t in 0..ctx_len-1:   row = pool[block_table[t // block_size], t % block_size, head]
    scores[g, t] = q[g] . K[row] * scale          for the `group` query heads of this KV head
    out[g] = sum_t softmax(scores[g])[t] * V[row]

Numba has no float16/bfloat16, so half-precision pools take the torch path.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _paged_decode(q, k_cache, v_cache, block_tables, ctx_lens, scale, out):  # pragma: no cover
    num_seqs, num_kv_heads, group, head_dim = q.shape
    block_size = k_cache.shape[1]
    for job in prange(num_seqs * num_kv_heads):
        b = job // num_kv_heads
        h = job % num_kv_heads
        ctx_len = ctx_lens[b]
        scores = np.empty((group, ctx_len), np.float32)
        for t in range(ctx_len):
            k = k_cache[block_tables[b, t // block_size], t % block_size, h]
            for g in range(group):
                s = np.float32(0.0)
                for d in range(head_dim):
                    s += q[b, h, g, d] * k[d]
                scores[g, t] = s * scale
        for g in range(group):
            peak = scores[g, 0]
            for t in range(1, ctx_len):
                peak = max(peak, scores[g, t])
            total = np.float32(0.0)
            for t in range(ctx_len):
                scores[g, t] = np.exp(scores[g, t] - peak)
                total += scores[g, t]
            for t in range(ctx_len):
                scores[g, t] /= total
        # one pass over V, each row shared by the group's query heads
        acc = np.zeros((group, head_dim), np.float32)
        for t in range(ctx_len):
            v = v_cache[block_tables[b, t // block_size], t % block_size, h]
            for g in range(group):
                w = scores[g, t]
                for d in range(head_dim):
                    acc[g, d] += w * v[d]
        for g in range(group):
            for d in range(head_dim):
                out[b, h, g, d] = acc[g, d]


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: np.ndarray,
    ctx_lens: np.ndarray,
    scale: float,
) -> torch.Tensor:
    """q [B, heads, head_dim] over one layer's pool -> [B, heads, head_dim]."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = np.empty((b, num_kv_heads, group, head_dim), np.float32)
    qn = q.contiguous().view(b, num_kv_heads, group, head_dim).numpy()
    _paged_decode(
        qn, kv_cache[0].numpy(), kv_cache[1].numpy(), block_tables, ctx_lens, np.float32(scale), out
    )
    return torch.from_numpy(out).view(b, num_heads, head_dim)
