"""Engine: the single-process inference core every worker actor runs.

    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))

Streaming callers use add_request() / step() / abort_request() instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from kvmesh.engine.block_manager import BlockManager, num_reusable_blocks
from kvmesh.engine.lora import AdapterCache, AdapterSpec
from kvmesh.engine.model_runner import ModelRunner
from kvmesh.engine.sampler import Sampler
from kvmesh.engine.scheduler import ScheduledBatch, Scheduler
from kvmesh.engine.sequence import Sequence
from kvmesh.gpu.block_pool import BlockPool
from kvmesh.gpu.kv_cache import allocate_kv_caches, default_num_blocks, kv_cache_shape
from kvmesh.gpu.loader import load_model, torch_dtype
from kvmesh.gpu.model_config import ModelConfig, capped_context
from kvmesh.kv.block_hash import hash_blocks, salt_id, salt_with_adapter
from kvmesh.params import SamplingParams
from kvmesh.protocol import Delta, KVEvent, WorkerLoad
from kvmesh.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from kvmesh.engine.kv_connector import KVConnector
    from kvmesh.engine.prefetch import Prefetch

log = structlog.get_logger(__name__)


@dataclass
class RequestOutput:
    """A request's state after a step. `new_*` hold what this step added (for streaming);
    text is held back while it could still be the start of a stop string."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: list[dict[int, float]] | None
    new_token_ids: list[int]
    new_text: str

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def delta(self) -> Delta:
        """This step's part of the stream, as workers and the in-process backend send it."""
        new_logprobs = None
        if self.logprobs is not None:  # aligned with token_ids: slice by position
            end = len(self.token_ids)
            new_logprobs = self.logprobs[end - len(self.new_token_ids) : end]
        return Delta(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids,
            new_text=self.new_text,
            new_logprobs=new_logprobs,
            finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_cached_tokens=self.num_cached_tokens,
        )


@dataclass(frozen=True)
class RemotePrefillTask:
    """A prompt parked on this (decode) engine for another worker to prefill: it must
    compute the prompt and write the KV of tokens num_cached_tokens.. into `block_ids`
    (the prompt's blocks here, in order; the first num_cached_tokens // block_size
    already hold the cached prefix)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    num_cached_tokens: int
    block_ids: list[int]
    adapter: str | None = None  # the LoRA adapter the prompt is computed through


class Request:
    """Engine-side state of one request around its Sequence: detokenizer and stream cursors."""

    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer) -> None:
        self.seq = seq
        self.detokenizer = detokenizer
        self.text = ""  # everything detokenized so far, before any stop-string cut
        self.holdback = max((len(s) for s in seq.params.stop), default=1) - 1
        self.stopped_by_string = False
        self.num_sent_tokens = 0
        self.num_sent_chars = 0


class Engine:
    """Continuous-batching engine over a paged KV pool with prefix caching."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        config: ModelConfig,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        kv_caches: list | None = None,
        kv_connector: KVConnector | None = None,
        max_model_len: int | None = None,
        hash_key: bytes | None = None,
        adapters: dict[str, str | Path] | None = None,
        max_loras: int = 4,
    ) -> None:
        """kv_caches: a pool allocated by the caller (e.g. in shared memory for the data
        plane), num_blocks blocks per layer; by default the engine allocates its own.
        kv_connector: offloads evicted blocks and onboards prefixes the pool lacks
        (kvmesh.engine.kv_connector); its block records must match this pool's.
        max_model_len: a cap on prompt + output tokens below the model's context.
        hash_key: the secret keying block hashes (the cluster's); None: this user's.
        adapters: LoRA adapters by name -> PEFT directory (more: register_adapter);
        max_loras: how many of them may be loaded at once (kvmesh.engine.lora)."""
        for name, value in (
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.block_size = block_size
        self.max_model_len = capped_context(config.max_model_len, max_model_len or 0)
        if num_blocks is None:
            num_blocks = default_num_blocks(
                config, block_size, torch_dtype(dtype), device, max_num_seqs * self.max_model_len
            )
        elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer or None, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.pool = BlockPool(
            num_blocks,
            block_size,
            enable_caching=enable_prefix_caching,
            track_evictions=kv_connector is not None,
        )
        if hash_key is None:
            from kvmesh.transport.keys import hash_key as user_hash_key

            hash_key = user_hash_key(None)
        self.salt = config.kv_salt(dtype, block_size, hash_key)
        self.scheduler = Scheduler(
            BlockManager(self.pool, self.salt, kv_connector),
            max_num_seqs,
            max_num_batched_tokens,
        )
        if kv_caches is None:
            kv_caches = allocate_kv_caches(
                config, num_blocks, block_size, torch_dtype(dtype), device
            )
        expected = kv_cache_shape(config, num_blocks, block_size)
        if len(kv_caches) != config.num_layers or tuple(kv_caches[0].shape) != expected:
            raise ValueError(f"kv_caches must be {config.num_layers} tensors of shape {expected}")
        record_bytes = config.kv_record_bytes(block_size, kv_caches[0].element_size())
        if kv_connector is not None and kv_connector.record_bytes != record_bytes:
            raise ValueError(
                f"kv_connector holds block records of {kv_connector.record_bytes} "
                f"bytes; this pool's are {record_bytes}"
            )
        self.kv_caches = kv_caches
        self.kv_connector = kv_connector
        self.salt_id = salt_id(self.salt)  # as the router compares
        self.runner = ModelRunner(model, self.kv_caches, block_size, device)
        self.sampler = Sampler(device, seed)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Sequence] = {}  # finished, blocks kept until release()
        self._ids = itertools.count()
        self.adapters = AdapterCache(config, device, torch_dtype(dtype), max_loras)
        if adapters is not None:
            if not isinstance(adapters, dict):
                raise ValueError(f"adapters must be a dict of name -> path, got {adapters!r}")
            for name, path in adapters.items():
                self.adapters.register(name, path)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        block_size: int = 16,
        num_blocks: int | None = None,
        **kwargs,
    ) -> Engine:
        """Load a local HF-format Llama/Mistral/Qwen2 directory and size its KV pool."""
        config = ModelConfig.from_pretrained(path)
        tokenizer = Tokenizer.from_pretrained(path)
        model = load_model(path, device=device, dtype=dtype)
        return cls(
            model,
            tokenizer,
            config,
            device=device,
            dtype=dtype,
            block_size=block_size,
            num_blocks=num_blocks,
            **kwargs,
        )

    # --- requests ---

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        remote_prefill: bool = False,
        hold_blocks: bool = False,
        resume_from: tuple[list[int], int] | None = None,
        prefetched: Prefetch | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Bad input raises ValueError naming the field.

        remote_prefill: allocate the prompt's blocks but let another worker compute
        them (see take_remote_prefills). hold_blocks: keep the blocks after the request
        finishes, so they can be sent to a peer, until release(request_id).
        resume_from: (output token ids, characters of their text already streamed) of a
        request that began on a worker that died: generation continues exactly where it
        stopped (same text, stop strings and max_tokens; seeded sampling included).
        prefetched: the KV connector's answer for the blocks of prefix_hashes(prompt and
        resumed outputs) past the device prefix, asked before adding (kvmesh.engine.prefetch).
        adapter: the registered LoRA adapter to run through (None: the base model); it is
        loaded if needed and kept until the request ends. AdapterBusyError (a ValueError)
        when max_loras adapters are all in use by unfinished requests.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_ids = self._prompt_ids(prompt)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests or request_id in self.held:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"adapter must be a registered adapter's name, got {adapter!r}")
        lora = None if adapter is None else self.adapters.acquire(adapter)
        seq = Sequence(
            request_id, prompt_ids, params, remote_prefill, hold_blocks, prefetched, lora
        )
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        request = Request(seq, detok)
        if resume_from is not None:
            try:
                self._resume(request, *resume_from)
            except ValueError:
                self._unpin(seq)
                raise
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request_id

    def _resume(self, request: Request, output_ids: list[int], num_sent_chars: int) -> None:
        seq = request.seq
        outputs = self._prompt_ids(list(output_ids)) if output_ids else []
        if len(outputs) >= seq.params.max_tokens or seq.remote_prefill:
            raise ValueError("resume_from: needs fewer outputs than max_tokens and local prefill")
        seq.token_ids += outputs
        if seq.logprobs is not None:
            seq.logprobs += [{} for _ in outputs]  # not known here; positions kept
        for _ in outputs:
            self.sampler.skip_draw(seq, self.config.vocab_size)
        request.text = request.detokenizer.push(outputs)
        request.num_sent_tokens = len(outputs)
        request.num_sent_chars = num_sent_chars

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        elif isinstance(prompt, list | tuple):
            ids = list(prompt)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)), None)
            if bad is not None:
                raise ValueError(f"prompt token ids must be integers, got {bad!r}")
            bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"prompt token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
                )
        else:
            raise ValueError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                "tokens, prompt included"
            )
        capacity = self.num_blocks * self.block_size
        if len(ids) + 1 > capacity:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the KV pool holds only {capacity} "
                f"(num_blocks={self.num_blocks} x block_size={self.block_size})"
            )
        return ids

    def prefix_hashes(
        self, token_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> list[int]:
        """The hashes of the full blocks a request of token_ids (through `adapter`) may
        find cached, as its admission names them: all but a block holding its last token
        (one token is always computed). ValueError for a prompt or adapter add_request
        refuses. It reads only what changes only by register_adapter: any thread may call it."""
        ids = self._prompt_ids(token_ids)
        salt = self.salt
        if adapter is not None:
            salt = salt_with_adapter(salt, self.adapters.spec(adapter).salt)
        end = num_reusable_blocks(len(ids), self.block_size) * self.block_size
        return hash_blocks(ids[:end], self.block_size, salt=params.salted(salt))

    # --- LoRA adapters ---

    def register_adapter(self, name: str, path: str | Path) -> AdapterSpec:
        """Serve the PEFT LoRA directory `path` as adapter `name` (loaded on first use).
        ValueError naming the file and field when it is no LoRA of this base model.
        spec.salt is its identity in block hashes: the salt the frontend mixes in with
        kvmesh.kv.block_hash.salt_with_adapter (the same as adapter_salt(path))."""
        return self.adapters.register(name, path)

    def _unpin(self, seq: Sequence) -> None:
        """The request is over: its adapter may be evicted (its KV stays cached)."""
        if seq.lora is not None:
            self.adapters.release(seq.lora.name)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._unpin(request.seq)
            if not request.seq.is_finished:
                self.scheduler.abort(request.seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- disaggregation ---

    def take_remote_prefills(self) -> list[RemotePrefillTask]:
        """Prompts admitted for remote prefill since the last call (blocks allocated)."""
        return [
            RemotePrefillTask(
                s.request_id,
                s.token_ids[: s.num_prompt_tokens],
                s.params,
                s.num_computed_tokens,
                list(s.block_table),
                s.adapter,
            )
            for s in self.scheduler.take_new_remote()
        ]

    def complete_remote_prefill(
        self, request_id: str, token_id: int, logprobs: dict[int, float] | None = None
    ) -> RequestOutput:
        """The prompt's KV is in place and the prefill worker sampled `token_id`:
        continue decoding here exactly as if the prompt had been computed locally."""
        request = self.requests[request_id]
        seq = request.seq
        assert self.scheduler.is_parked(request_id), f"{request_id} awaits no remote prefill"
        self.scheduler.resume_remote(seq)
        self.sampler.skip_draw(seq, self.config.vocab_size)
        seq.append_token(token_id)
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        self._check_stop(seq)
        return self._output(request, seq)

    def fail_remote_prefill(self, request_id: str) -> None:
        """The prefill worker failed: compute the prompt here instead."""
        request = self.requests.get(request_id)
        if request is not None and self.scheduler.is_parked(request_id):
            self.scheduler.compute_locally(request.seq)

    def held_block_ids(self, request_id: str) -> list[int]:
        """Blocks of a finished hold_blocks request (its prompt's KV, in order)."""
        return list(self.held[request_id].block_table)

    def release(self, request_id: str) -> None:
        """Free the blocks of a finished hold_blocks request."""
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.scheduler.release(seq)

    # --- stepping ---

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that progressed or ended."""
        batch = self.scheduler.schedule()
        if self.kv_connector is not None:
            self._transfer_kv(batch)
        touched = list(batch.finished)
        if batch.items:
            logits, sample_seqs = self.runner.run(batch)
            self.scheduler.update(batch)
            if sample_seqs:
                for seq, token in zip(sample_seqs, self.sampler(logits, sample_seqs), strict=True):
                    seq.append_token(token)
                    self._check_stop(seq)
                touched += sample_seqs
        return [self._output(self.requests[seq.request_id], seq) for seq in touched]

    def _transfer_kv(self, batch: ScheduledBatch) -> None:
        """Offload the blocks this schedule evicted while they still hold their KV, then
        load the admitted prefixes (which may land in those very blocks)."""
        self.kv_connector.save(self.pool.take_evicted(), self.kv_caches)
        for onboarding in batch.onboards:
            num_loaded = self.kv_connector.load(
                onboarding.hits, onboarding.block_ids, self.kv_caches
            )
            self.scheduler.finish_onboard(onboarding, num_loaded)

    def _check_stop(self, seq: Sequence) -> None:
        request = self.requests[seq.request_id]
        token = seq.token_ids[-1]
        params = seq.params
        searched = len(request.text)
        request.text += request.detokenizer.push([token])
        reason = None
        if params.stop and self._find_stop(request, searched):
            reason = "stop"
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _find_stop(self, request: Request, searched: int) -> bool:
        """Cut the text before the first stop string; only the new text (and the
        held-back tail a stop string may have started in) is searched."""
        start = max(searched - request.holdback, 0)
        for stop in request.seq.params.stop:
            at = request.text.find(stop, start)
            if at >= 0:
                request.seq.text = request.text[:at]
                request.stopped_by_string = True
                return True
        return False

    def _output(self, request: Request, seq: Sequence) -> RequestOutput:
        finished = seq.is_finished
        if not request.stopped_by_string:
            if finished:
                request.text += request.detokenizer.flush()
            seq.text = request.text
        visible = len(seq.text) if finished else max(len(seq.text) - request.holdback, 0)
        new_text = seq.text[request.num_sent_chars : visible]
        request.num_sent_chars = max(request.num_sent_chars, visible)
        new_ids = seq.token_ids[seq.num_prompt_tokens + request.num_sent_tokens :]
        request.num_sent_tokens = seq.num_output_tokens
        if finished:
            if self.requests.pop(seq.request_id, None) is not None:
                self._unpin(seq)
            if seq.hold_blocks and seq.finish_reason != "abort":
                self.held[seq.request_id] = seq
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids,
            text=seq.text,
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens or 0,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,  # a snapshot:
            new_token_ids=new_ids,  # the engine thread keeps appending to the live list
            new_text=new_text,
        )

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion together; outputs in the order of `prompts`.
        adapters: one adapter name for all, or one (or None: the base model) per prompt."""
        if not isinstance(prompts, list):
            raise ValueError(f"prompts must be a list, got {type(prompts).__name__}")
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        if isinstance(adapters, list):
            if len(adapters) != len(prompts):
                raise ValueError(f"adapters has {len(adapters)} entries for {len(prompts)} prompts")
        else:
            adapters = [adapters] * len(prompts)
        ids = []
        try:
            for prompt, p, adapter in zip(prompts, params, adapters, strict=True):
                ids.append(self.add_request(prompt, p, adapter=adapter))
        except ValueError:
            for request_id in ids:
                self.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[request_id] for request_id in ids]

    # --- introspection ---

    def take_kv_events(self) -> list[KVEvent]:
        """Prefix-cache stored/removed events since the last call (for the router): the
        device pool's, then the connector's host and disk tiers'."""
        events = self.pool.take_events()
        if self.kv_connector is not None:
            events += self.kv_connector.take_events()
        return events

    def load(self) -> WorkerLoad:
        """What a router weighs: work queued and running, pool use, and the connector's
        counters per tier (the worker adds its own totals). Engine thread only."""
        stats = self.scheduler.stats()
        return WorkerLoad(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            num_remote=stats.num_remote + len(self.held),
            kv_usage=self.pool.usage,
            queued_prefill_tokens=stats.queued_prefill_tokens,
            preemptions_total=stats.num_preemptions,
            tiers=self.kv_connector.metrics() if self.kv_connector is not None else {},
            adapters=self.adapters.loaded(),
        )

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.stats().num_preemptions
