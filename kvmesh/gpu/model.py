"""A Llama-family decoder (Llama, Mistral, Qwen2) that reads and writes the paged KV pool.

Numerics follow transformers' implementation step for step (RMSNorm in float32,
rotate-half RoPE with float32 cos/sin) so greedy output matches it token for token.
q/k/v and gate/up projections are fused into one matmul each at load time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.gpu.attention import AttentionMetadata, paged_attention
from kvmesh.gpu.lora import LayerLora, LoraBatch
from kvmesh.gpu.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return h.mul_(self.weight)  # a fresh tensor: weight * h, in place


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies per rotary pair, with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin [T, 1, head_dim / 2]: transformers' tables are these twice over."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.unsqueeze(0)
        return freqs.cos().to(dtype).unsqueeze(1), freqs.sin().to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, head_dim] with half-width cos/sin, bit for bit
    transformers' x * cos + cat(-x2, x1) * sin (x1 * c + (-x2) * s == x1 * c - x2 * s),
    without materializing the rotated copy."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x1, cos, out=out[..., :half]).sub_(x2 * sin)
    torch.mul(x2, cos, out=out[..., half:]).add_(x1 * sin)
    return out


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata, lora: LayerLora | None):
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.add("qkv_proj", x, qkv)
        # q and k rotated together: one set of elementwise ops over [T, heads + kv_heads]
        qk = qkv[:, : self.q_size + self.kv_size].unflatten(-1, (-1, self.head_dim))
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale).flatten(1)
        if lora is None:
            return self.o_proj(out)
        return lora.add("o_proj", out, self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, lora: LayerLora | None):
        if lora is None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate).mul_(up))
        gate, up = lora.add("gate_up_proj", x, self.gate_up_proj(x)).chunk(2, dim=-1)
        h = F.silu(gate).mul_(up)
        return lora.add("down_proj", h, self.down_proj(h))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, meta, lora: LayerLora | None = None):
        # x is the stream's own tensor (the embedding's output, then these sums): in place
        x = x.add_(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta, lora))
        return x.add_(self.mlp(self.post_attention_layernorm(x), lora))


class CausalLM(nn.Module):
    """The decoder stack plus LM head. forward() takes one flat row per scheduled token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """lora: the step's adapters per row (kvmesh.gpu.lora); None runs the base model."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, cos, sin, kv_cache, meta, None if lora is None else lora.layer(i))
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_weights(self, weights) -> None:
        """Copy (name, tensor) pairs in HF naming into this module, fusing q/k/v and gate/up."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            parts = name.split(".")
            shard = None
            if len(parts) >= 3 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                parts[-2] = target
            target_name = ".".join(parts)
            if target_name not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in {self.config.architecture}"
                )
            param = params[target_name]
            with torch.no_grad():
                self._copy_shard(param, tensor, parts[-2], shard)
            loaded.add(target_name)
        if self.config.tie_word_embeddings and "lm_head.weight" not in loaded:
            self.lm_head.weight = self.embed_tokens.weight
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"checkpoint at {self.config.path!r} lacks tensors: {', '.join(missing[:5])}"
            )

    def _copy_shard(self, param, tensor, module_name, shard):
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{module_name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                )
            param.copy_(tensor)
            return
        if module_name == "qkv_proj":
            q, kv = (
                self.config.num_heads * self.config.head_dim,
                self.config.num_kv_heads * self.config.head_dim,
            )
            sizes = [q, kv, kv]
        else:
            sizes = [self.config.intermediate_size] * 2
        start = sum(sizes[:shard])
        param.narrow(0, start, sizes[shard]).copy_(tensor)
