"""GGUF files made from the tiny model (kvmesh/gpu/tiny.py) the way llama.cpp's converter
writes them: its tensor names, q/k rows permuted for its rope layout (Llama only), norms
kept in F32, 2-D tensors quantized where their rows fit the type's blocks (else F32, as
llama.cpp falls back), and the tiny tokenizer as `tokenizer.ggml.*` metadata."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from kvmesh.gpu import tiny

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GGUF_NAMES = {  # Hugging Face suffix -> GGUF suffix, per layer
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def make_weights(seed: int = 0, *, tie: bool = False, bias: bool = False) -> dict[str, np.ndarray]:
    """The tiny model's weights in Hugging Face names; tie drops lm_head, bias adds q/k/v
    biases (Qwen2)."""
    weights = tiny.make_weights(seed)
    if tie:
        del weights["lm_head.weight"]
    if bias:
        rng = np.random.default_rng(seed + 1)
        for i in range(tiny.NUM_LAYERS):
            for proj in ("q_proj", "k_proj", "v_proj"):
                rows = weights[f"model.layers.{i}.self_attn.{proj}.weight"].shape[0]
                bias_values = rng.standard_normal(rows) * 0.5
                weights[f"model.layers.{i}.self_attn.{proj}.bias"] = bias_values.astype(np.float32)
    return weights


def gguf_name(name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in top:
        return top[name]
    _, _, layer, suffix = name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[suffix]}"


def permute_rope(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's two rotary halves interleaved row by row."""
    head_dim = values.shape[0] // num_heads
    shape = values.shape
    return values.reshape(num_heads, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_gguf(
    path: Path,
    tiny_dir: Path,
    qtype: str = "F32",
    *,
    arch: str = "llama",
    name: str = "tiny",
    weights: dict[str, np.ndarray] | None = None,
    rope_scaling: str | None = None,
) -> Path:
    """Write `weights` (the tiny model's by default) as a GGUF of `arch` with 2-D tensors
    in `qtype` (and llama.cpp's rope.scaling.type, if given); returns path."""
    weights = make_weights() if weights is None else weights
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(tiny.NUM_LAYERS)
    writer.add_context_length(tiny.MAX_POSITIONS)
    writer.add_embedding_length(tiny.HIDDEN_SIZE)
    writer.add_feed_forward_length(tiny.INTERMEDIATE_SIZE)
    writer.add_head_count(tiny.NUM_HEADS)
    writer.add_head_count_kv(tiny.NUM_KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(tiny.HEAD_DIM)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(4.0)
    add_tokenizer(writer, tiny_dir)
    for hf, values in weights.items():
        if arch == "llama" and ".q_proj." in hf:
            values = permute_rope(values, tiny.NUM_HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            values = permute_rope(values, tiny.NUM_KV_HEADS)
        add_tensor(writer, gguf_name(hf), values, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: str) -> None:
    kind = gguf.GGMLQuantizationType[qtype]
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    if values.ndim == 1 or values.shape[-1] % block:
        kind = gguf.GGMLQuantizationType.F32
    data = gguf.quants.quantize(values, kind)
    writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)


def add_tokenizer(writer: gguf.GGUFWriter, tiny_dir: Path) -> None:
    """The tiny byte-level BPE as llama.cpp's "gpt2" tokenizer metadata."""
    model = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    control = set(tiny.SPECIAL_TOKENS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in control else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tiny.BOS_ID)
    writer.add_eos_token_id(tiny.EOS_ID)
    writer.add_eot_token_id(tiny.END_ID)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tiny.CHAT_TEMPLATE)
