"""Import a GGUF checkpoint (llama.cpp's format) into a Hugging Face directory that the
Engine loads unchanged: model.safetensors (sharded past 2 GiB), config.json,
generation_config.json, tokenizer.json and tokenizer_config.json (special tokens and the
chat template).

What the import undoes of llama.cpp's converter:
- Tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...
- Quantization: every supported type is dequantized by the `gguf` package (llama.cpp's own
  reader and reference dequantizers), then stored in the chosen dtype.
- RoPE layout: for Llama (and Mistral, which llama.cpp files as Llama) the converter
  reorders each head's q/k rows from Hugging Face's half-split rotary layout to
  interleaved pairs; `unpermute_rope` puts them back. Qwen2 files are not permuted.
- Tied embeddings: a file without `output.weight` shares the embedding as its head.

The tokenizer comes from the file's `tokenizer.ggml.*` metadata through transformers'
GGUF tokenizer conversion: that, and `gguf`, are needed here only (`pip install
'kvmesh[gguf]'`); the directory written is then served without either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kvmesh.gpu.model_config import DTYPES
from kvmesh.progress import Progress

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# GGUF general.architecture -> (Hugging Face architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
MISTRAL = ("MistralForCausalLM", "mistral")  # llama.cpp writes Mistral as "llama"
ROPE_PERMUTED = frozenset({"llama"})  # architectures whose q/k rows the converter permuted
MAX_SHARD_BYTES = 2 << 30
MAGIC = b"GGUF"
TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
REQUIRED = object()  # GGUFCheckpoint.arch_field's default: the key must be there


class GGUFImportError(ValueError):
    """A GGUF file kvmesh cannot import; the message names the file and what is wrong
    (the tensor type, the architecture, the tensor, or where the file ends)."""


class GGUFCheckpoint:
    """One GGUF file, read with the `gguf` package and checked whole before anything is
    written: its architecture, every tensor's name and type, and that the file holds
    every tensor's bytes."""

    def __init__(self, file: str | Path) -> None:
        self.file = Path(file)
        self.reader = open_reader(self.file)
        self.gguf_architecture = str(self.field("general.architecture", ""))
        if self.gguf_architecture not in ARCHITECTURES:
            raise GGUFImportError(
                f"{self.file.name}: architecture {self.gguf_architecture!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)} (Llama, Mistral, Qwen2)"
            )
        self.architecture, self.model_type = ARCHITECTURES[self.gguf_architecture]
        names = f"{self.field('general.name', '')} {self.field('general.basename', '')}"
        if self.gguf_architecture == "llama" and "mistral" in names.lower():
            self.architecture, self.model_type = MISTRAL
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.check_tensors()

    def field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_field(self, key: str, default=REQUIRED):
        """`<architecture>.<key>`; a missing key without a default is an error naming it."""
        value = self.field(f"{self.gguf_architecture}.{key}", default)
        if value is REQUIRED:
            raise GGUFImportError(
                f"{self.file.name}: metadata key {self.gguf_architecture}.{key} is missing"
            )
        return value

    def check_tensors(self) -> None:
        size = self.file.stat().st_size
        for name, tensor in self.tensors.items():
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise GGUFImportError(
                    f"{self.file.name}: tensor {name!r} has type {kind}, which kvmesh cannot "
                    f"import; supported types: {', '.join(SUPPORTED_TYPES)}"
                )
            if hf_name(name) is None:
                raise GGUFImportError(
                    f"{self.file.name}: tensor {name!r} has no place in {self.architecture}"
                    + (" (llama3 rope frequency factors)" if name == "rope_freqs.weight" else "")
                )
            if tensor.data_offset + tensor.n_bytes > size:
                raise GGUFImportError(
                    f"{self.file.name}: truncated: tensor {name!r} ends at byte "
                    f"{tensor.data_offset + tensor.n_bytes}, the file at {size}"
                )
        if "token_embd.weight" not in self.tensors:
            raise GGUFImportError(f"{self.file.name}: no token_embd.weight tensor")

    def config(self, dtype: str) -> dict:
        """config.json: everything kvmesh.gpu.model_config reads, in transformers' keys."""
        heads = int(self.arch_field("attention.head_count"))
        hidden = int(self.arch_field("embedding_length"))
        config = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": int(self.tensors["token_embd.weight"].shape[-1]),
            "hidden_size": hidden,
            "intermediate_size": int(self.arch_field("feed_forward_length")),
            "num_hidden_layers": int(self.arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch_field("attention.head_count_kv", heads)),
            "head_dim": int(self.arch_field("attention.key_length", hidden // heads)),
            "hidden_act": "silu",
            "max_position_embeddings": int(self.arch_field("context_length", 2048)),
            "rms_norm_eps": decimal(self.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": decimal(self.arch_field("rope.freq_base", 10000.0)),
            "rope_scaling": self.rope_scaling(),
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "torch_dtype": dtype,
        }
        if self.model_type == "qwen2":
            config["use_sliding_window"] = False
        return config

    def rope_scaling(self) -> dict | None:
        kind = self.arch_field("rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind == "linear":
            return {
                "rope_type": "linear",
                "factor": decimal(self.arch_field("rope.scaling.factor")),
            }
        raise GGUFImportError(
            f"{self.file.name}: rope scaling {kind!r} is not supported; supported: none, linear"
        )

    def generation_config(self) -> dict:
        eos = [self.field(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot")]
        return {
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": sorted({token for token in eos if token is not None}),
        }

    def weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 array) for every tensor, in the file's order."""
        from gguf.quants import dequantize

        heads = int(self.arch_field("attention.head_count"))
        kv_heads = int(self.arch_field("attention.head_count_kv", heads))
        for name, tensor in self.tensors.items():
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
            if self.gguf_architecture in ROPE_PERMUTED and ".attn_q." in name:
                values = unpermute_rope(values, heads)
            elif self.gguf_architecture in ROPE_PERMUTED and ".attn_k." in name:
                values = unpermute_rope(values, kv_heads)
            yield hf_name(name), values

    def write_tokenizer(self, out: Path) -> None:
        """tokenizer.json and tokenizer_config.json (special tokens, chat template) from
        the file's tokenizer.ggml.* metadata, converted by transformers as its
        `AutoTokenizer.from_pretrained(..., gguf_file=...)` does, without re-reading the
        tensors."""
        try:
            from transformers import PreTrainedTokenizerFast
            from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
        except ImportError:
            raise GGUFImportError(
                "importing a GGUF's tokenizer needs transformers >= 5: pip install 'kvmesh[gguf]'"
            ) from None
        try:
            architecture, vocabulary, special = get_gguf_tokenizer(str(self.file))
            backend, _ = convert_gguf_tokenizer(architecture, vocabulary)
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
        except (ValueError, KeyError, TypeError) as exc:
            raise GGUFImportError(f"{self.file.name}: its tokenizer cannot be read: {exc}") from exc
        # The wrapper applies add_bos_token / add_eos_token to the post-processor.
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": int(self.arch_field("context_length", 2048)),
            "clean_up_tokenization_spaces": False,
        }
        for key in (*TOKENIZER_FLAGS, *SPECIAL_TOKENS, "chat_template"):
            if special.get(key) is not None:
                config[key] = special[key]
        write_json(out / "tokenizer_config.json", config)


def open_reader(file: Path):
    """gguf.GGUFReader over `file`, or a GGUFImportError saying why not."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFImportError(
            "importing GGUF files needs the gguf package: pip install 'kvmesh[gguf]'"
        ) from None
    if not file.is_file():
        raise GGUFImportError(f"{file}: no such file")
    with file.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise GGUFImportError(f"{file.name}: not a GGUF file (it does not start with GGUF)")
    try:
        return GGUFReader(file)
    except Exception as exc:  # the reader's own errors are not typed: reshape, struct, index
        raise GGUFImportError(
            f"{file.name}: cannot be read as GGUF (truncated or corrupt): {exc}"
        ) from exc


def hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name`, or None if it has no place."""
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    match = LAYER_NAME.fullmatch(name)
    if match and match[2] in LAYER_TENSORS:
        return f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}"
    return None


def unpermute_rope(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. Within each head of `head_dim` rows,
    Hugging Face keeps the two halves rotated together apart, the converter interleaves
    them:

        Hugging Face:  x0 x1 ... x(h-1) | y0 y1 ... y(h-1)     (h = head_dim / 2)
        GGUF:          x0 y0 x1 y1 ... x(h-1) y(h-1)

    so row 2j + k of a GGUF head is row k*h + j of the Hugging Face head."""
    head_dim = values.shape[0] // num_heads
    shape = values.shape
    return values.reshape(num_heads, head_dim // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def import_gguf(file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the Hugging Face directory of GGUF `file` into `out_dir` (made if absent;
    files there of the same names are replaced). Raises GGUFImportError for what
    cannot be imported, before writing anything."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with Progress(f"reading {Path(file).name}"):
        checkpoint = GGUFCheckpoint(file)
        config = checkpoint.config(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with Progress("converting its tokenizer"):
        checkpoint.write_tokenizer(out)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", checkpoint.generation_config())
    with Progress(f"importing {Path(file).name}", total=len(checkpoint.tensors)) as progress:
        write_weights(out, progress.track(checkpoint.weights()), dtype)
    return out


def write_weights(out: Path, weights: Iterator[tuple[str, np.ndarray]], dtype: str) -> None:
    """Safetensors of `weights` in `dtype`: model.safetensors, or, past MAX_SHARD_BYTES,
    shards and their index. Each shard is written once full, so at most one is in memory."""
    import torch
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []  # (shard file, its tensor names)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        file = out / f"model-{len(written) + 1:05d}.safetensors.part"
        save_file(shard, str(file), metadata={"format": "pt"})
        written.append((file, list(shard)))
        shard.clear()

    for name, values in weights:
        # a copy: float32 tensors come straight from the file's read-only memory map
        tensor = torch.from_numpy(np.array(values, dtype=np.float32)).to(getattr(torch, dtype))
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > MAX_SHARD_BYTES:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += size
    flush()
    if len(written) == 1:
        names = ["model.safetensors"]
    else:
        count = len(written)
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {
            tensor: name
            for name, (_, tensors) in zip(names, written, strict=True)
            for tensor in tensors
        }
        write_json(out / "model.safetensors.index.json", {"weight_map": weight_map})
    for name, (file, _) in zip(names, written, strict=True):
        file.chmod(0o644)  # save_file makes it 0600; a model is not a secret
        file.rename(out / name)


def decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not
    9.999999747378752e-06): the shortest that rounds to the same float32."""
    return float(str(np.float32(value)))


def write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
