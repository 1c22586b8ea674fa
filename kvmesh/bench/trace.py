"""Mooncake request traces, replayed on a small model: `kvmesh bench serve routing`.

A trace line (FAST'25 release, kvcache-ai/Mooncake) is one request:

    {"timestamp": ms since the first request, "input_length": prompt tokens,
     "output_length": generated tokens, "hash_ids": one id per 512-token prompt block}

The ids are chained prefix hashes: two requests share their first k ids exactly when
they share their first k*512 prompt tokens. Synthesis keeps that property at a smaller
scale, each id becoming one block of `tokens_per_hash` token ids drawn from a generator
seeded by (seed, id); since an id already names its whole prefix, equal ids give equal
blocks and equal leading ids give equal prompt prefixes:

    hash_ids   [ 7 ][ 8 ][ 9 ]              input_length 1300 (of 3 x 512)
    tokens     [b7 ][b8 ][b9 ]              tokens_per_hash each (16: 48 tokens)
    prompt     [b7 ][b8 ][b9 ]..cut         round(1300 * 16 / 512) = 41 tokens

Output lengths are divided by `output_scale` (at least `min_output_tokens`; EOS is to
be ignored so each request generates exactly that many), arrival times by `speedup`.
A prompt that would not leave room for its output in the model's context is cut to
fit (its prefix, so sharing survives); `truncated` counts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvmesh.gpu.block_pool import hash_blocks

MOONCAKE_BLOCK_TOKENS = 512
FIRST_TOKEN_ID = 16  # ids below are the tokenizer's special range


@dataclass(frozen=True)
class TraceRecord:
    """One trace line as written."""

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReplayRequest:
    """One request to send: when (seconds after the first), the prompt, how many tokens."""

    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    requests: list[ReplayRequest]
    truncated: int  # prompts cut to fit the context


def default_trace_path() -> Path:
    """<repo>/../shared/traces/synthetic_trace.jsonl: the trace stays outside the repo."""
    return Path(__file__).resolve().parents[3] / "shared" / "traces" / "synthetic_trace.jsonl"


def load_trace(path: str | Path, start: int = 0, num_requests: int | None = None
               ) -> list[TraceRecord]:
    """Records start .. start+num_requests of a Mooncake JSONL trace; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trace {path} not found: pass --trace FILE (a Mooncake JSONL trace, e.g. "
            "FAST25-release/traces/synthetic_trace.jsonl of kvcache-ai/Mooncake)")
    records = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if number <= start or not line.strip():
                continue
            if num_requests is not None and len(records) == num_requests:
                break
            try:
                raw = json.loads(line)
                records.append(TraceRecord(int(raw["timestamp"]), int(raw["input_length"]),
                                           int(raw["output_length"]), tuple(raw["hash_ids"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a Mooncake trace line "
                                 f"(timestamp, input_length, output_length, hash_ids): {exc!r}"
                                 ) from exc
    if not records:
        raise ValueError(f"{path} has no requests after line {start}")
    return records


class PromptSynthesizer:
    """Token blocks per hash id, made once each: equal ids give equal blocks."""

    def __init__(self, vocab_size: int, tokens_per_hash: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.tokens_per_hash = tokens_per_hash
        self.seed = seed
        self.blocks: dict[int, list[int]] = {}

    def block(self, hash_id: int) -> list[int]:
        if hash_id not in self.blocks:
            rng = np.random.default_rng([self.seed, hash_id])
            self.blocks[hash_id] = rng.integers(FIRST_TOKEN_ID, self.vocab_size,
                                                self.tokens_per_hash).tolist()
        return self.blocks[hash_id]

    def prompt(self, record: TraceRecord) -> list[int]:
        num_tokens = round(record.input_length * self.tokens_per_hash / MOONCAKE_BLOCK_TOKENS)
        tokens = [t for h in record.hash_ids for t in self.block(h)]
        return tokens[:max(1, num_tokens)]


def synthesize(records: list[TraceRecord], *, vocab_size: int, max_model_len: int,
               tokens_per_hash: int = 16, output_scale: int = 8, min_output_tokens: int = 4,
               speedup: float = 1.0, seed: int = 0) -> Workload:
    """The records as requests for a model of `vocab_size` and `max_model_len`."""
    synth = PromptSynthesizer(vocab_size, tokens_per_hash, seed)
    t0 = records[0].timestamp_ms
    requests, truncated = [], 0
    for record in records:
        max_tokens = max(min_output_tokens, record.output_length // output_scale)
        prompt = synth.prompt(record)
        room = max_model_len - max_tokens  # the frontend wants prompt + output <= context
        if len(prompt) > room:
            prompt = prompt[:room]
            truncated += 1
        requests.append(ReplayRequest((record.timestamp_ms - t0) / 1000 / speedup, prompt,
                                      max_tokens))
    return Workload(requests, truncated)


def cached_fraction_bound(requests: list[ReplayRequest], block_size: int) -> float:
    """Upper bound on the cached prompt fraction: prompt tokens in full blocks that an
    earlier request of the workload already had (one infinite cache)."""
    seen: set[int] = set()
    hits = total = 0
    for request in requests:
        hashes = hash_blocks(request.prompt_token_ids, block_size)  # chained: whole prefix
        hits += sum(h in seen for h in hashes)
        seen.update(hashes)
        total += len(request.prompt_token_ids)
    return hits * block_size / total if total else 0.0
