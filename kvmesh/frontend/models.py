"""The models a cluster frontend serves: one ModelFront per [[models]] entry.

A ModelFront is what the HTTP layer (kvmesh.frontend.app) sees of one model: a Backend
with that model's tokenizer, context and vocabulary, whose requests the frontend actor
places on that model's workers with that model's block-hash salt. The actor owns the
sockets, the requests in flight and the metrics; a ModelFront only names the model.

Torch-free: the tokenizer and the model's config.json, no weights.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmesh.frontend.admission import Admission, AdmissionPolicy
from kvmesh.frontend.metrics import BackendMetrics, ReuseMeter
from kvmesh.gpu.model_config import ModelConfig, capped_context
from kvmesh.kv.block_hash import adapter_salt, salt_id, salt_with_adapter
from kvmesh.params import SamplingParams
from kvmesh.protocol import Delta
from kvmesh.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvmesh.actors.frontend import FrontendActor


@dataclass(frozen=True)
class ServedModel:
    """One served model, as the frontend needs it (roles.init_frontend fills it from
    [model] or [[models]])."""

    name: str  # its name in the API
    path: str  # its Hugging Face directory (tokenizer, config.json, weights)
    block_size: int = 16
    dtype: str = "float32"  # the workers' KV dtype: part of every block hash
    max_model_len: int = 0  # cap on prompt + output tokens; 0 = the model's context
    expected_workers: int = 1  # /health waits for this many of its workers
    adapters: tuple[tuple[str, str], ...] = ()  # LoRA (name, PEFT directory) on this model
    admission: AdmissionPolicy = AdmissionPolicy()  # its queue policy in this frontend


class ModelFront:
    """One model of the cluster as a Backend: its requests go to its workers only."""

    def __init__(self, served: ServedModel, hash_key: bytes, frontend: FrontendActor) -> None:
        model = ModelConfig.from_pretrained(served.path)
        self.served = served
        self.model_name = served.name
        self.block_size = served.block_size
        self.tokenizer = Tokenizer.from_pretrained(served.path)
        self.max_model_len = capped_context(model.max_model_len, served.max_model_len)
        self.vocab_size = model.vocab_size
        self.salt = model.kv_salt(served.dtype, served.block_size, hash_key)
        self.salt_id = salt_id(self.salt)
        self.reuse = ReuseMeter(served.block_size)  # what its prompts could reuse
        self.frontend = frontend
        self.admission = Admission(served.admission, served.name)  # its adapters' too
        self.default_priority = served.admission.default_priority
        # each LoRA adapter's identity in block hashes: the workers salt theirs alike
        self.adapter_salts = {name: adapter_salt(path) for name, path in served.adapters}

    async def start(self) -> None:
        """Nothing: the frontend actor starts the sockets."""

    async def close(self) -> None:
        """Nothing: the frontend actor closes the sockets."""

    def ready(self) -> bool:
        return self.frontend.model_ready(self.model_name)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        return self.frontend.generate(request_id, prompt_token_ids, params, model=self)

    def salt_for(self, adapter: str | None) -> bytes:
        """The block-hash salt of a request through `adapter` (None: the base model)."""
        if adapter is None:
            return self.salt
        return salt_with_adapter(self.salt, self.adapter_salts[adapter])

    def routes(self) -> dict[str, ModelFront | AdapterFront]:
        """What the API serves of this model, by the name a request gives: the model,
        and each adapter as "<model>:<adapter>"."""
        routes: dict[str, ModelFront | AdapterFront] = {self.model_name: self}
        for adapter in self.adapter_salts:
            routes[f"{self.model_name}:{adapter}"] = AdapterFront(self, adapter)
        return routes

    async def abort(self, request_id: str) -> None:
        await self.frontend.abort(request_id)

    def metrics(self) -> BackendMetrics:
        return self.frontend.metrics()


class AdapterFront:
    """A LoRA adapter of a served model as a Backend: the model's tokenizer and context,
    its requests run through the adapter on the model's workers."""

    def __init__(self, base: ModelFront, adapter: str) -> None:
        self.base = base
        self.adapter = adapter
        self.model_name = f"{base.model_name}:{adapter}"
        self.tokenizer = base.tokenizer
        self.max_model_len = base.max_model_len
        self.vocab_size = base.vocab_size
        self.default_priority = base.default_priority

    async def start(self) -> None:
        """Nothing: the frontend actor starts the sockets."""

    async def close(self) -> None:
        """Nothing: the frontend actor closes the sockets."""

    def ready(self) -> bool:
        return self.base.ready()

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        return self.base.frontend.generate(
            request_id, prompt_token_ids, params, model=self.base, adapter=self.adapter
        )

    async def abort(self, request_id: str) -> None:
        await self.base.abort(request_id)

    def metrics(self) -> BackendMetrics:
        return self.base.metrics()
