"""Paged attention over the KV pool, in plain torch so one code path serves CPU and CUDA.

A step's tokens are flattened into one row per token, decode tokens first:

    rows:  [ d0 d1 ... d(B-1) | p0 chunk ......... | p1 chunk .... ]
             one per decode     q_len rows each prefilling sequence

Token t's K/V go to pool slot `slot_mapping[t]`, where

    slot = block_table[pos // block_size] * block_size + pos % block_size

and a layer's pool `[2, num_blocks, block_size, kv_heads, head_dim]` viewed as
`[2, num_blocks * block_size, kv_heads, head_dim]` is indexed by slot directly.
Decodes are attended together, their contexts padded to the longest and masked;
each prefilling sequence is attended on its own (few per step, long queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvmesh.gpu.cpu_attention import paged_decode_attention


@dataclass
class PrefillSpan:
    """One prefilling sequence's rows: q_start..q_start+q_len, over ctx_len context tokens.

    `ctx_slots` is None when the chunk is the whole context (nothing cached before it),
    so attention can use the fresh K/V and a plain causal mask.
    """

    q_start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Where a step's tokens go and what they attend to. Decodes come in one of two
    forms, chosen once per ModelRunner: padded slots + mask for the torch path, or
    block tables + context lengths for the CPU kernel (kvmesh.gpu.cpu_attention)."""

    slot_mapping: torch.Tensor  # [num_tokens] long
    num_decodes: int
    prefills: list[PrefillSpan]
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_ctx] long, padding -> slot 0
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_ctx] bool, True = attend
    decode_tables: np.ndarray | None = None  # [num_decodes, max_blocks] int64
    decode_ctx_lens: np.ndarray | None = None  # [num_decodes] int64


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store one layer's new K/V rows ([tokens, kv_heads, head_dim]) at their pool slots."""
    flat = kv_cache.flatten(1, 2)
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, heads, hd], k/v [T, kv_heads, hd] (already stored) -> out [T, heads, hd]."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if meta.decode_tables is not None:
        out[: meta.num_decodes] = paged_decode_attention(
            q[: meta.num_decodes], kv_cache, meta.decode_tables, meta.decode_ctx_lens, scale
        )
    elif meta.num_decodes:
        out[: meta.num_decodes] = _decode(
            q[: meta.num_decodes], kv_cache, meta, num_kv_heads, scale
        )
    for span in meta.prefills:
        rows = slice(span.q_start, span.q_start + span.q_len)
        out[rows] = _prefill(q[rows], k[rows], v[rows], kv_cache, span, num_heads, scale)
    return out


def _decode(q, kv_cache, meta, num_kv_heads, scale):
    # Grouped-query trick: the `group` query heads that share a KV head become
    # `group` query rows of that KV head, so K/V are never repeated.
    b, num_heads, hd = q.shape
    group = num_heads // num_kv_heads
    flat = kv_cache.flatten(1, 2)
    keys = flat[0][meta.decode_slots].transpose(1, 2)  # [B, kvh, L, hd]
    values = flat[1][meta.decode_slots].transpose(1, 2)
    qg = q.view(b, num_kv_heads, group, hd)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(b, num_heads, hd)


def _prefill(q, k, v, kv_cache, span, num_heads, scale):
    num_kv_heads = k.shape[1]
    if span.ctx_slots is None:
        keys, values, mask, causal = k, v, None, True
    else:
        flat = kv_cache.flatten(1, 2)
        keys, values = flat[0][span.ctx_slots], flat[1][span.ctx_slots]
        # query i sits at position ctx_len - q_len + i and sees keys 0..that position
        offset = span.ctx_len - span.q_len
        q_pos = torch.arange(span.q_len, device=q.device).unsqueeze(1) + offset
        mask = torch.arange(span.ctx_len, device=q.device).unsqueeze(0) <= q_pos
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    return out.squeeze(0).transpose(0, 1)
