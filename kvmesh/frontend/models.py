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

from kvmesh.frontend.metrics import BackendMetrics, ReuseMeter
from kvmesh.gpu.model_config import ModelConfig, capped_context
from kvmesh.kv.block_hash import salt_id
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

    async def abort(self, request_id: str) -> None:
        await self.frontend.abort(request_id)

    def metrics(self) -> BackendMetrics:
        return self.frontend.metrics()
