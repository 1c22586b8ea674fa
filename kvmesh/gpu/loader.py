"""Load a local Hugging Face model directory (single or sharded safetensors) into CausalLM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvmesh.gpu.model import CausalLM, rope_inv_freq
from kvmesh.gpu.model_config import DTYPES, ModelConfig
from kvmesh.progress import Progress


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(
        f"model path {str(path)!r} has no model.safetensors or model.safetensors.index.json"
    )


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> CausalLM:
    """Build the model for `path`'s config.json and fill it from its safetensors."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    with Progress(f"loading {path.name} (tensors)") as progress:
        with torch.device(device):
            model = CausalLM(config).to(torch_dtype(dtype))
            # RoPE frequencies stay float32 whatever the weights' dtype, as in transformers.
            model.rotary.inv_freq = rope_inv_freq(config)
        model.load_hf_weights(progress.track(iter_weights(path)))
    return model.eval().requires_grad_(False)
