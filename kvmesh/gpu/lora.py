"""LoRA adapters in PEFT's format, read for CausalLM, and their delta on a mixed batch.

A PEFT LoRA directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...)
and `adapter_model.safetensors`, one pair of tensors per adapted linear:

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

and the adapted layer computes y = W x + scaling * B (A x), scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora); dropout is training-only. CausalLM fuses q/k/v
and gate/up into one matmul each, so their adapters are fused too: A stacks the parts'
A rows, B places each part's B in its own output rows and rank columns (block-diagonal),
and a part the adapter leaves alone is zeros:

    qkv A = [A_q; A_k; A_v]   [r_q + r_k + r_v, hidden]
    qkv B = [[B_q, 0, 0],     [q + 2 kv, r_q + r_k + r_v]   (scaling folded into B)
             [0, B_k, 0],
             [0, 0, B_v]]

A batch mixes rows of several adapters and of the base model. LoraStack concatenates the
batch's adapters along the rank and LoraBatch masks each row to its own adapter's
columns: three ops per adapted linear whatever the number of adapters (two when every
row has the same one), and no LoraBatch at all when no row has an adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kvmesh.gpu.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# HF projection -> (CausalLM's fused module, which part of it)
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
TARGETS = tuple(FUSED)
FUSED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$"
)


@dataclass(frozen=True)
class AdapterConfig:
    """What kvmesh reads of adapter_config.json."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: bool  # ranks vary per module: each module's own rank scales it

    def scaling(self, rank: int) -> float:
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)


def read_adapter_config(path: Path) -> AdapterConfig:
    """adapter_config.json of a PEFT LoRA directory; ValueError naming the file and field
    for anything kvmesh does not apply (DoRA, biases, extra trained modules, ...)."""
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise ValueError(f"adapter path {str(path)!r} is not a directory")
    if not file.is_file():
        raise ValueError(f"adapter path {str(path)!r} has no {CONFIG_FILE}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: must hold a JSON object")

    def refuse(field: str, allowed: str) -> None:
        raise ValueError(f"{file}: {field} must be {allowed}, got {raw.get(field)!r}")

    if raw.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", '"LORA"')
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        refuse("r", "a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        refuse("lora_alpha", "a positive number")
    for field, allowed, ok in (
        ("use_dora", "false (DoRA is not supported)", not raw.get("use_dora")),
        ("bias", '"none"', raw.get("bias", "none") == "none"),
        ("modules_to_save", "null or empty", not raw.get("modules_to_save")),
        ("fan_in_fan_out", "false", not raw.get("fan_in_fan_out")),
        ("alpha_pattern", "empty", not raw.get("alpha_pattern")),
        ("use_qalora", "false", not raw.get("use_qalora")),
        ("lora_bias", "false", not raw.get("lora_bias")),
        ("layer_replication", "null", not raw.get("layer_replication")),
        ("trainable_token_indices", "null", not raw.get("trainable_token_indices")),
        ("target_parameters", "null", not raw.get("target_parameters")),
        ("alora_invocation_tokens", "null", not raw.get("alora_invocation_tokens")),
    ):
        if not ok:
            refuse(field, allowed)
    return AdapterConfig(
        r, float(alpha), bool(raw.get("use_rslora")), bool(raw.get("rank_pattern"))
    )


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each HF projection of one decoder layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def read_adapter(path: Path, config: ModelConfig) -> tuple[AdapterConfig, dict]:
    """The adapter's config and {(layer, projection): (A, B)} from its safetensors,
    shapes checked against the base model's; ValueError naming the file and tensor."""
    adapter = read_adapter_config(path)
    pairs = read_adapter_tensors(path, config)
    for (layer, proj), (a, _) in pairs.items():
        if not adapter.rank_pattern and a.shape[0] != adapter.r:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: layers.{layer}.{proj} has rank {a.shape[0]}, "
                f"{CONFIG_FILE} says r={adapter.r}"
            )
    return adapter, pairs


def read_adapter_tensors(path: Path, config: ModelConfig) -> dict[tuple[int, str], tuple]:
    """{(layer, projection): (A, B)} from adapter_model.safetensors, shapes checked
    against the base model's; ValueError naming the file and tensor otherwise."""
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise ValueError(f"adapter path {str(path)!r} has no {WEIGHTS_FILE}")
    shapes = projection_shapes(config)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                match = TENSOR_NAME.match(name)
                if match is None:
                    raise ValueError(
                        f"{file}: tensor {name!r} is no LoRA weight of a layer's "
                        f"{', '.join(TARGETS)} (embedding, lm_head and other modules are "
                        "not supported)"
                    )
                found.setdefault((int(match[1]), match[2]), {})[match[3]] = f.get_tensor(name)
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors: a truncated or foreign file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    if not found:
        raise ValueError(f"{file}: holds no LoRA tensors")
    pairs = {}
    for (layer, proj), parts in sorted(found.items()):
        where = f"{file}: layers.{layer}.{proj}"
        if layer >= config.num_layers:
            raise ValueError(
                f"{where}: the base model {config.path!r} has {config.num_layers} layers"
            )
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{where}: has lora_{''.join(parts)} but not both lora_A and lora_B")
        a, b = parts["A"], parts["B"]
        fan_in, fan_out = shapes[proj]
        rank = a.shape[0] if a.dim() == 2 else -1
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank) or rank < 1:
            raise ValueError(
                f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                f"base model {config.path!r}, which needs [r, {fan_in}] and [{fan_out}, r] "
                "(an adapter trained for another base model?)"
            )
        pairs[layer, proj] = (a, b)
    return pairs


class LoraWeights:
    """One adapter's tensors on the device, fused as CausalLM's projections are:
    `modules[layer][fused_name] = (A [R, in], B [out, R] * scaling)`."""

    def __init__(self, name: str, modules: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]):
        self.name = name
        self.modules = modules
        self.salt = b""  # the files' identity (kvmesh.kv.block_hash.adapter_salt), if known

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.modules for pair in layer.values() for t in pair)


def load_lora(
    name: str, path: str | Path, config: ModelConfig, device: str, dtype: torch.dtype
) -> LoraWeights:
    """Read a PEFT LoRA directory for the base model `config` (see the module docstring)."""
    path = Path(path)
    adapter, pairs = read_adapter(path, config)
    shapes = projection_shapes(config)
    modules = []
    for layer in range(config.num_layers):
        parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (i, proj), (a, b) in pairs.items():
            if i != layer:
                continue
            scaled = b.float() * adapter.scaling(a.shape[0])
            parts.setdefault(FUSED[proj][0], {})[proj] = (a.float(), scaled)
        modules.append(
            {
                fused: tuple(t.to(device, dtype) for t in _fuse(by_proj, fused, shapes))
                for fused, by_proj in parts.items()
            }
        )
    return LoraWeights(name, modules)


def _fuse(by_proj: dict, fused: str, shapes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused module's A [sum r, in] and block-diagonal B [sum out, sum r] from its
    adapted parts (see the module docstring); a part left alone gets zero rows in B."""
    order = [proj for proj, (name, _) in FUSED.items() if name == fused]
    a = torch.cat([by_proj[p][0] for p in order if p in by_proj])
    b = torch.zeros(sum(shapes[p][1] for p in order), a.shape[0])
    row = col = 0
    for proj in order:
        if proj in by_proj:
            part = by_proj[proj][1]
            b[row : row + part.shape[0], col : col + part.shape[1]] = part
            col += part.shape[1]
        row += shapes[proj][1]
    return a, b


def write_random_lora(
    path: str | Path,
    config: ModelConfig,
    *,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] = TARGETS,
    seed: int = 0,
) -> Path:
    """Write a PEFT LoRA directory of seeded random weights for the base model `config`
    (every layer, `targets` projections), as PEFT's save_pretrained names it: what the
    benchmark serves without PEFT installed. B is random too (PEFT initialises it to
    zeros, which would make an adapter the base model), scaled so the delta moves each
    projection by about a quarter of its output."""
    from safetensors.torch import save_file

    path = Path(path)
    bad = sorted(set(targets) - set(TARGETS))
    if bad:
        raise ValueError(f"targets must be among {', '.join(TARGETS)}, got {', '.join(bad)}")
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj in targets:
            fan_in, fan_out = projection_shapes(config)[proj]
            group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            a = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
            b = torch.randn(fan_out, rank, generator=gen) * (0.25 * rank / alpha / math.sqrt(rank))
            tensors[f"{name}.lora_A.weight"] = a
            tensors[f"{name}.lora_B.weight"] = b
    save_file(tensors, str(path / WEIGHTS_FILE))
    adapter_config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(config.path),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
    }
    (path / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return path


class LoraStack:
    """A set of adapters concatenated along the rank, per layer and module, so that one
    step's rows of all of them take three ops per adapted linear, whatever their number:

        h = x @ A_cat.T          [T, R_1 + ... + R_k]   every row against every adapter
        h *= mask                 row t keeps only its adapter's columns (base rows: none)
        out += h @ B_cat.T        B_cat = [B_1 | ... | B_k]   [out, R_1 + ... + R_k]

    The masked columns cost k times the (small) rank work of one adapter; kept across
    steps while the set of adapters in the batch stays the same (ModelRunner)."""

    def __init__(self, adapters: tuple[LoraWeights, ...]):
        self.adapters = adapters
        self.layers: list[dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]] = []
        for i in range(len(adapters[0].modules)):
            modules = {}
            for module in FUSED_MODULES:
                parts = [
                    (g, w.modules[i][module])
                    for g, w in enumerate(adapters)
                    if module in w.modules[i]
                ]
                if not parts:
                    continue
                a = torch.cat([pair[0] for _, pair in parts])
                b = torch.cat([pair[1] for _, pair in parts], dim=1)
                owner = tuple(g for g, pair in parts for _ in range(pair[0].shape[0]))
                modules[module] = (a, b, owner)
            self.layers.append(modules)


class LoraBatch:
    """The adapters of one step's rows: built from one adapter (or None) per scheduled
    sequence and its row count; `layer(i)` is what decoder layer i applies."""

    def __init__(self, stack: LoraStack, row_group: torch.Tensor | None):
        self.stack = stack
        self.row_group = row_group  # [T] index into stack.adapters, -1: base; None: all 0
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def of(
        cls,
        adapters: list[LoraWeights | None],
        num_rows: list[int],
        device: torch.device,
        stack: LoraStack | None = None,
    ) -> LoraBatch | None:
        """None when no row has an adapter: the base model runs untouched. `stack`: the
        previous step's, reused when it holds the same adapters."""
        distinct = tuple({id(w): w for w in adapters if w is not None}.values())
        if not distinct:
            return None
        if stack is None or stack.adapters != distinct:
            stack = LoraStack(distinct)
        if len(distinct) == 1 and None not in adapters:
            return cls(stack, None)
        index = {id(w): g for g, w in enumerate(distinct)}
        groups = np.array([-1 if w is None else index[id(w)] for w in adapters], np.int64)
        row_group = np.repeat(groups, np.array(num_rows, np.int64))
        return cls(stack, torch.from_numpy(row_group).to(device))

    def layer(self, i: int) -> LayerLora:
        return LayerLora(self, self.stack.layers[i])

    def mask(self, owner: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """[T, R] ones where row t's adapter owns column r (one per column layout)."""
        if self.row_group is None:
            return None
        mask = self.masks.get(owner)
        if mask is None:
            columns = torch.tensor(owner, device=like.device)
            mask = (self.row_group.unsqueeze(1) == columns.unsqueeze(0)).to(like.dtype)
            self.masks[owner] = mask
        return mask


class LayerLora:
    """The LoRA work of one decoder layer in one step."""

    def __init__(self, batch: LoraBatch, modules: dict):
        self.batch = batch
        self.modules = modules

    def add(self, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += the rows' adapters' delta of `module` on x; returns out."""
        entry = self.modules.get(module)
        if entry is None:
            return out
        a, b, owner = entry
        h = x @ a.t()
        mask = self.batch.mask(owner, h)
        if mask is not None:
            h.mul_(mask)
        return out.addmm_(h, b.t())
