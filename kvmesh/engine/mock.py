"""MockEngine: the Engine without a model, for many workers per process.

`model.engine = "mock"` in cluster.toml makes every prefill and decode worker run a
MockEngine instead of the torch Engine. Everything but the forward pass and the sampler
is the real engine's: the Scheduler (continuous batching, chunked prefill, preemption),
the BlockPool (prefix caching, LRU eviction) and so the real KV events (BlockStored with
the prompt's block hashes, BlockRemoved when its pool is full and evicts), the real
load reports, stop conditions, streaming deltas, remote prefill and its KV data plane.
So the worker actor, the router and the frontend run unchanged against it.

What it replaces:

- The forward pass: a timing model. A step that computes P prompt tokens and D decode
  tokens (sequences that compute one token) sleeps, on the engine thread,

      prefill_s_per_token * P + (decode_s_per_step + decode_s_per_seq * D if D else 0)

  all times `scale`. The defaults are the bundled tiny model's, measured with
  `python -m kvmesh.engine.mock --calibrate` (calibrate(): the real Engine, 1 torch
  thread, the minimum of 9 runs per point: a step prefilling one 512-token prompt, and
  decode steps of batches of 1 and 32) on this project's 2-core CPU machine,
  2026-12-07, while other jobs kept its load average at 6-9:
  prefill_s_per_token = 2.4e-3 (512 tokens: 1.22 s), decode_s_per_step = 2.0e-2,
  decode_s_per_seq = 4.8e-4 (a batch of 32: 36 ms). Three runs that day gave
  2.4e-3 to 7.4e-3 s per prefill token as the load went from 6 to 14: the machine's
  load, not the model, sets them; on a quiet machine they are lower, and `scale`
  stretches or shrinks them all (scale 0.1: a forward pass ten times faster).
- The sampler: deterministic tokens, each from the one before and its position
  (`mock_token`), so a reply depends on its prompt only, whichever worker makes it,
  and tests know every token in advance. Token ids are "plain" (plain_token_ids): past
  the model's bos and eos ids, so a reply ends by max_tokens, a stop string or a stop
  token id, and each decoding alone to whole characters, so the streamed text of a
  reply is the tokenizer's decode of its ids. Logprobs, when asked, give the chosen
  token logprob 0.0.
- The KV pool: one layer, one head of dimension 1 (a few bytes per token), so a
  remote prefill's KV transfer between mock workers moves real (tiny) blocks. Block
  hashes are salted with the real model's fingerprint, so they equal the frontend's.
  A mock worker has no cache actor tiers.

Weights are never loaded: the model directory is read for config.json, the tokenizer
(the engine detokenizes its tokens, as the real one does) and the fingerprint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmesh.engine.engine import Engine
from kvmesh.engine.scheduler import ScheduledBatch
from kvmesh.engine.sequence import Sequence

TOKEN_MULTIPLIER = 7919  # primes: consecutive tokens and positions spread over the vocabulary
POSITION_MULTIPLIER = 104729


@dataclass(frozen=True)
class MockTiming:
    """Seconds a mock step takes; see the module docstring for how they were measured."""

    prefill_s_per_token: float = 2.4e-3
    decode_s_per_step: float = 2.0e-2
    decode_s_per_seq: float = 4.8e-4
    scale: float = 1.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{field.name} must be a number >= 0, got {value!r}")

    def step_seconds(self, num_prefill_tokens: int, num_decodes: int) -> float:
        """How long a step computing these tokens takes."""
        seconds = self.prefill_s_per_token * num_prefill_tokens
        if num_decodes:
            seconds += self.decode_s_per_step + self.decode_s_per_seq * num_decodes
        return seconds * self.scale


_PLAIN: dict[tuple[str, int], list[int]] = {}  # (model path, vocab size) -> plain ids


def plain_token_ids(tokenizer, vocab_size: int, bos_token_id, eos_token_ids, key="") -> list[int]:
    """The ids a mock reply uses: past every bos and eos id, each decoding alone to
    whole characters (no U+FFFD), so a reply's streamed text is the decode of its ids
    whatever the prompt. Cached per `key` (the model path): one process may hold a
    thousand mock engines of one model."""
    cached = _PLAIN.get((key, vocab_size)) if key else None
    if cached is not None:
        return cached
    first = 1 + max((bos_token_id or 0, *eos_token_ids))
    plain = []
    for token in range(first, vocab_size):
        text = tokenizer.decode([token])
        if text and "\ufffd" not in text:
            plain.append(token)
    if not plain:
        raise ValueError(f"the vocabulary ({vocab_size} ids) has no plain token for a mock")
    if key:
        _PLAIN[(key, vocab_size)] = plain
    return plain


def mock_token(prev: int, position: int, plain: list[int]) -> int:
    """The token a mock engine emits at `position` (its index in prompt + output) after
    token `prev`: one of `plain` (plain_token_ids), the same on every worker."""
    return plain[(prev * TOKEN_MULTIPLIER + position * POSITION_MULTIPLIER) % len(plain)]


def mock_reply(prompt: list[int], max_tokens: int, plain: list[int]) -> list[int]:
    """The max_tokens tokens a mock engine answers `prompt` with (no stop condition)."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(mock_token(tokens[-1], len(tokens), plain))
    return tokens[len(prompt) :]


class MockRunner:
    """The ModelRunner's place: sleeps the timing model's step time, computes nothing."""

    def __init__(self, timing: MockTiming, sleep: Callable[[float], None] = time.sleep) -> None:
        self.timing = timing
        self.sleep = sleep
        self.busy_s = 0.0  # simulated compute so far

    def run(self, batch: ScheduledBatch) -> tuple[None, list[Sequence]]:
        """As ModelRunner.run, without logits: the sequences that sample next, in order."""
        num_prefill = num_decodes = 0
        sample_seqs = []
        for seq, num_new in batch.items:
            if num_new == 1:
                num_decodes += 1
            else:
                num_prefill += num_new
            if seq.num_computed_tokens + num_new == seq.num_tokens:
                sample_seqs.append(seq)
        seconds = self.timing.step_seconds(num_prefill, num_decodes)
        self.busy_s += seconds
        if seconds:
            self.sleep(seconds)
        return None, sample_seqs


class MockSampler:
    """The Sampler's place: mock_token for every sequence, whatever its params."""

    def __init__(self, plain: list[int]) -> None:
        self.plain = plain

    def __call__(self, logits: None, seqs: list[Sequence]) -> list[int]:
        tokens = []
        for seq in seqs:
            token = mock_token(seq.token_ids[-1], seq.num_tokens, self.plain)
            if seq.logprobs is not None:
                seq.logprobs.append({token: 0.0})
            tokens.append(token)
        return tokens

    def skip_draw(self, seq: Sequence, vocab_size: int) -> None:
        """Nothing to skip: a mock token depends on the tokens before it only."""


class MockEngine(Engine):
    """An Engine whose forward pass is a timing model and whose tokens are mock_token's."""

    def __init__(
        self,
        config,
        tokenizer,
        *,
        timing: MockTiming | None = None,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs,
    ) -> None:
        """config and tokenizer: the real model's (kvmesh.gpu.model_config.ModelConfig,
        kvmesh.tokenizer.Tokenizer); kwargs: Engine's (block_size, num_blocks, ...),
        but no model, kv_caches nor kv_connector. num_blocks is required."""
        for name in ("kv_caches", "kv_connector", "device"):
            if kwargs.get(name) not in (None, "cpu"):
                raise ValueError(f"a mock engine takes no {name} (got {kwargs[name]!r})")
        if kwargs.get("num_blocks") is None:
            raise ValueError("num_blocks must be given for a mock engine (kv.device_blocks)")
        # The pool's geometry only: the salt still comes from config.path's files
        pool_config = dataclasses.replace(config, num_layers=1, num_kv_heads=1, head_dim=1)
        super().__init__(None, tokenizer, pool_config, **kwargs)
        self.runner = MockRunner(timing or MockTiming(), sleep)
        plain = plain_token_ids(
            tokenizer, config.vocab_size, config.bos_token_id, self.eos_token_ids, config.path
        )
        self.sampler = MockSampler(plain)

    @classmethod
    def from_model_dir(cls, path: str | Path, **kwargs) -> MockEngine:
        """A mock engine of the model at `path` (config.json and tokenizer; no weights)."""
        from kvmesh.gpu.model_config import ModelConfig
        from kvmesh.tokenizer import Tokenizer

        return cls(ModelConfig.from_pretrained(path), Tokenizer.from_pretrained(path), **kwargs)

    @property
    def timing(self) -> MockTiming:
        return self.runner.timing


def build_mock_engine(settings) -> MockEngine:
    """A worker's mock engine from its WorkerSettings (kvmesh.actors.worker)."""
    return MockEngine.from_model_dir(
        settings.model_path,
        timing=settings.mock_timing,
        dtype=settings.dtype,
        block_size=settings.block_size,
        num_blocks=settings.num_blocks,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len or None,
        hash_key=settings.hash_key,
    )


def calibrate(path: str | Path | None = None, repeats: int = 9) -> dict[str, float]:
    """Measure the real Engine on the model at `path` (default: the bundled tiny model)
    with 1 torch thread: the minimum over `repeats` of a step prefilling one 512-token
    prompt, and of a decode step of batches of 1 and 32; returns MockTiming's fields."""
    import random

    import torch

    from kvmesh.gpu.tiny import ensure_tiny
    from kvmesh.params import SamplingParams

    torch.set_num_threads(1)
    engine = Engine.from_pretrained(path or ensure_tiny(), num_blocks=1024)
    rng = random.Random(0)
    vocab = engine.config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(16, vocab) for _ in range(n)]

    def timed_step() -> float:
        start = time.perf_counter()
        engine.step()
        return time.perf_counter() - start

    engine.generate([prompt(8)], SamplingParams(max_tokens=2))  # kernels compiled
    prefill = []
    for _ in range(repeats):
        engine.add_request(prompt(512), SamplingParams(max_tokens=1, ignore_eos=True))
        prefill.append(timed_step())
        while engine.has_unfinished():
            engine.step()
    decode = {}
    for batch in (1, 32):
        for _ in range(batch):
            engine.add_request(prompt(64), SamplingParams(max_tokens=repeats + 4, ignore_eos=True))
        engine.step()  # the prompts, in one step
        decode[batch] = min(timed_step() for _ in range(repeats))
        while engine.has_unfinished():
            engine.step()
    per_seq = (decode[32] - decode[1]) / 31
    return {
        "prefill_s_per_token": min(prefill) / 512,
        "decode_s_per_step": decode[1] - per_seq,
        "decode_s_per_seq": per_seq,
    }


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] != ["--calibrate"]:
        sys.exit("usage: python -m kvmesh.engine.mock --calibrate [prints MockTiming's fields]")
    print(json.dumps(calibrate(), indent=1))
