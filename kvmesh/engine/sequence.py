"""Sequence: one request's tokens, KV blocks and progress through the engine."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from kvmesh.kv.block_hash import hash_blocks
from kvmesh.params import SamplingParams

if TYPE_CHECKING:
    from kvmesh.engine.prefetch import Prefetch
    from kvmesh.gpu.lora import LoraWeights


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    REMOTE_PREFILL = "remote_prefill"  # blocks allocated, a prefill worker is filling them
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens are prompt + generated. `num_computed_tokens` of them have K/V in the pool;
    when all have, the model's next-token logits are sampled and one token appended."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        remote_prefill: bool = False,
        hold_blocks: bool = False,
        prefetched: Prefetch | None = None,
        lora: LoraWeights | None = None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.remote_prefill = remote_prefill  # another worker computes the prompt's KV
        self.hold_blocks = hold_blocks  # keep the blocks after finishing, until released
        self.prefetched = prefetched  # the KV connector's hits, asked when it arrived
        self.lora = lora  # the adapter this request runs through (None: the base model)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first scheduling
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids
        self.num_registered_blocks = 0  # leading blocks published in the pool's prefix cache
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.generator = None  # torch.Generator for seeded sampling, made by the sampler

    @property
    def adapter(self) -> str | None:
        return None if self.lora is None else self.lora.name

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def full_block_hashes(self, block_size: int, salt: bytes) -> list[int]:
        """Hashes of every full block of token_ids, extending the cached list incrementally."""
        done = len(self.block_hashes) * block_size
        if self.num_tokens - done >= block_size:
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes += hash_blocks(self.token_ids[done:], block_size, parent, salt)
        return self.block_hashes

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
