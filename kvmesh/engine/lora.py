"""AdapterCache: the LoRA adapters an Engine knows by name, and the bounded set of them
loaded on its device.

Policy. Adapters are registered by name -> PEFT directory (register checks the files
against the base model's shapes and computes the adapter's block-hash salt, without
keeping any tensor). A request that names an adapter acquires it when it is added:
loaded from disk if it is not resident, and pinned until the request finishes or is
aborted. At most `max_loras` adapters are resident; loading one more evicts the least
recently acquired adapter that no unfinished request pins. When all `max_loras` are
pinned, acquire raises AdapterBusyError (code "adapters_busy"): the caller retries
when a request finishes, or sends the request to another worker. Requests of the base
model (no adapter) never touch this cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from kvmesh.gpu.lora import LoraWeights, load_lora, read_adapter
from kvmesh.gpu.model_config import ModelConfig
from kvmesh.kv.block_hash import adapter_salt

log = structlog.get_logger(__name__)


class AdapterBusyError(ValueError):
    """Every resident adapter slot is pinned by unfinished requests: retry later."""

    code = "adapters_busy"


@dataclass(frozen=True)
class AdapterSpec:
    """A registered adapter: where its files are and its identity in block hashes."""

    name: str
    path: Path
    salt: bytes  # kvmesh.kv.block_hash.adapter_salt of its files


@dataclass
class ResidentAdapter:
    weights: LoraWeights
    num_users: int = 0  # unfinished requests pinning it


class AdapterCache:
    """Registered adapters and the LRU set of at most `max_loras` loaded ones (see the
    module docstring for the policy)."""

    def __init__(self, config: ModelConfig, device: str, dtype: torch.dtype, max_loras: int):
        if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_loras = max_loras
        self.specs: dict[str, AdapterSpec] = {}
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU first
        self.num_loads = 0

    def register(self, name: str, path: str | Path) -> AdapterSpec:
        """Make `name` servable from the PEFT directory `path`; ValueError naming the file
        and field when it is no LoRA adapter of this base model. Registering a name again
        replaces its path (a resident copy of the old files is dropped when unpinned)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"adapter name must be a non-empty string without ':', got {name!r}")
        path = Path(path)
        read_adapter(path, self.config)
        spec = AdapterSpec(name, path, adapter_salt(path))
        old = self.specs.get(name)
        self.specs[name] = spec
        if old is not None and old.salt != spec.salt:
            resident = self.resident.get(name)
            if resident is not None and resident.num_users == 0:
                del self.resident[name]
        log.info("adapter_registered", adapter=name, path=str(path), salt=spec.salt.hex())
        return spec

    def spec(self, name: str) -> AdapterSpec:
        """The registered adapter `name`; ValueError naming the registered ones if none."""
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise ValueError(f"adapter {name!r} is not registered (registered: {known})")
        return spec

    def acquire(self, name: str) -> LoraWeights:
        """Pin adapter `name` for one request, loading it (and evicting an unpinned one)
        if needed. ValueError for an unknown name, AdapterBusyError when full."""
        spec = self.spec(name)
        resident = self.resident.get(name)
        if resident is not None and resident.weights.salt != spec.salt:  # re-registered
            if resident.num_users:
                raise AdapterBusyError(
                    f"adapter {name!r} was registered anew while requests still use its "
                    "previous files: retry when they finish"
                )
            del self.resident[name]
            resident = None
        if resident is None:
            resident = self._load(spec)
        resident.num_users += 1
        self.resident.move_to_end(name)
        return resident.weights

    def release(self, name: str) -> None:
        """One request of adapter `name` finished (or was aborted)."""
        resident = self.resident[name]
        assert resident.num_users > 0, f"adapter {name} released more often than acquired"
        resident.num_users -= 1

    def _load(self, spec: AdapterSpec) -> ResidentAdapter:
        if len(self.resident) >= self.max_loras:
            victim = next((n for n, r in self.resident.items() if r.num_users == 0), None)
            if victim is None:
                raise AdapterBusyError(
                    f"max_loras={self.max_loras} adapters are loaded and all in use by "
                    f"unfinished requests ({', '.join(self.resident)}): retry when one finishes"
                )
            del self.resident[victim]
            log.info("adapter_evicted", adapter=victim)
        weights = load_lora(spec.name, spec.path, self.config, self.device, self.dtype)
        weights.salt = spec.salt  # which files these are, should the name be registered anew
        self.num_loads += 1
        resident = self.resident[spec.name] = ResidentAdapter(weights)
        log.info("adapter_loaded", adapter=spec.name, bytes=weights.nbytes)
        return resident

    def loaded(self) -> list[str]:
        """Resident adapters, least recently acquired first."""
        return list(self.resident)
