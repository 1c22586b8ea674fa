"""What kvmesh needs to know of a Hugging Face model directory: torch-free, so the
frontend can validate requests (context length, vocabulary) without loading torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# architecture name -> whether q/k/v projections carry a bias
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # weights and KV cache dtypes
DTYPES = tuple(DTYPE_BYTES)
KV_FORMAT_VERSION = 2  # the layout of a KV block record; a change invalidates stored ones
RECORD_TAG_BYTES = 16  # a record starts with its block's full hash (block_hash.HASH_BYTES)
WEIGHT_SAMPLE_BYTES = 1 << 20  # read at a weight file's start, middle and end
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from config.json."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    checkpoint_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    def kv_salt(self, dtype: str, block_size: int, hash_key: bytes) -> bytes:
        """Salt of this model's KV block hashes: the same prompt under another model,
        other weights, another KV dtype or block size must never match (router, workers
        and tiers all key blocks by these hashes). hash_key, the cluster's secret
        (kvmesh.transport.keys.hash_key), makes them a keyed hash: nobody without it can
        compute a block's hash, let alone aim a prompt at a collision."""
        return f"{self.architecture}:{self.fingerprint(dtype, block_size)}:".encode() + hash_key

    def fingerprint(self, dtype: str, block_size: int) -> str:
        """What stored KV must have been computed under to be reused: config.json, the
        weight files (names, sizes, and samples of their bytes: new weights of the same
        shapes differ there), the KV dtype, the block size and the record format. Hex."""
        import xxhash

        digest = xxhash.xxh3_128()
        for part in (
            f"kv-format:{KV_FORMAT_VERSION}",
            f"dtype:{dtype}",
            f"block_size:{block_size}",
            self._config_text(),
        ):
            digest.update(part.encode() + b"\0")
        root = Path(self.path)
        weights = (
            sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            if self.path and root.is_dir()
            else []
        )
        for file in weights:
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}\0".encode())
            with file.open("rb") as f:
                for at in (0, size // 2, max(size - WEIGHT_SAMPLE_BYTES, 0)):
                    f.seek(at)
                    digest.update(f.read(WEIGHT_SAMPLE_BYTES))
        return digest.hexdigest()

    def _config_text(self) -> str:
        config_file = Path(self.path) / "config.json" if self.path else None
        if config_file is not None and config_file.is_file():
            return json.dumps(json.loads(config_file.read_text()), sort_keys=True)
        return repr(self)  # a config made from a dict: its fields are all there is

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `path`/config.json; refuse what the engine cannot run, naming the field."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"model path {str(path)!r} has no config.json (not a HF model directory)"
            )
        raw = json.loads(config_file.read_text())
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, path: str = "") -> ModelConfig:
        architectures = raw.get("architectures") or []
        arch = architectures[0] if architectures else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architectures: {arch!r} is not supported; supported architectures are "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers >= 5 writes `rope_parameters` (theta included) instead of `rope_scaling`.
        rope_scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
        rope_type = (rope_scaling or {}).get(
            "rope_type", (rope_scaling or {}).get("type", "default")
        )
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type: {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        max_len = raw.get("max_position_embeddings", 2048)
        if raw.get("sliding_window") and raw.get(
            "use_sliding_window", arch == "MistralForCausalLM"
        ):
            # Without sliding-window attention the engine is exact only inside one window.
            max_len = min(max_len, raw["sliding_window"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            path=path,
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or hidden // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta") or (rope_scaling or {}).get("rope_theta", 10000.0),
            rope_scaling=rope_scaling if rope_type != "default" else None,
            max_position_embeddings=max_len,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=raw.get("attention_bias", SUPPORTED_ARCHITECTURES[arch]),
            checkpoint_dtype=dtype,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def kv_record_bytes(self, block_size: int, dtype_bytes: int) -> int:
        """Bytes of one block's record in the host and disk tiers: its hash tag, then
        its K and V."""
        return RECORD_TAG_BYTES + self.kv_bytes_per_block(block_size, dtype_bytes)

    def kv_bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        """Bytes of K and V for one block across all layers."""
        per_layer = 2 * block_size * self.num_kv_heads * self.head_dim * dtype_bytes
        return per_layer * self.num_layers


def capped_context(model_len: int, cap: int) -> int:
    """model.max_model_len applied: 0 keeps the model's context; a cap never exceeds it."""
    return min(model_len, cap) if cap else model_len
