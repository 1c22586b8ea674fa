"""Workloads for the serving benchmarks (Mooncake traces scaled to a small model, random
prompts) and the client side that sends them and records what came back.

A Mooncake trace line (FAST'25 release, kvcache-ai/Mooncake) is one request:

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

Output lengths are divided by `output_scale` (at least `min_output_tokens`; EOS is
ignored so each request generates exactly that many), arrival times by `speedup`. A
prompt that would leave no room for its output in the model's context is cut to fit
(its prefix, so sharing survives); `truncated` counts them.

Stdlib-only at import (httpx loads in the functions that send), so `kvmesh --help`
stays instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmesh.progress import Progress

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx

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
    """The trace shipped in the package (kvmesh/bench/traces/mooncake_like.jsonl)."""
    from kvmesh.bench.traces import DEFAULT_TRACE

    return DEFAULT_TRACE


def load_trace(
    path: str | Path, start: int = 0, num_requests: int | None = None
) -> list[TraceRecord]:
    """Requests start .. start+num_requests of a Mooncake JSONL trace; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trace {path} not found: pass a Mooncake JSONL trace, e.g. "
            "FAST25-release/traces/synthetic_trace.jsonl of kvcache-ai/Mooncake"
        )
    records = []
    with path.open() as f:
        lines = (line for line in f if line.strip())
        for number, line in enumerate(lines, 1):
            if number <= start:
                continue
            if num_requests is not None and len(records) == num_requests:
                break
            try:
                raw = json.loads(line)
                records.append(
                    TraceRecord(
                        int(raw["timestamp"]),
                        int(raw["input_length"]),
                        int(raw["output_length"]),
                        tuple(raw["hash_ids"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}, request {number}: not a Mooncake trace line "
                    f"(timestamp, input_length, output_length, hash_ids): {exc!r}"
                ) from exc
    if not records:
        raise ValueError(f"{path} has no requests after the first {start}")
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
            rng = random.Random(f"{self.seed}:{hash_id}")  # str seeds are stable everywhere
            self.blocks[hash_id] = random_prompt(rng, self.tokens_per_hash, self.vocab_size)
        return self.blocks[hash_id]

    def prompt(self, record: TraceRecord) -> list[int]:
        num_tokens = round(record.input_length * self.tokens_per_hash / MOONCAKE_BLOCK_TOKENS)
        tokens = [t for h in record.hash_ids for t in self.block(h)]
        return tokens[: max(1, num_tokens)]


def synthesize(
    records: list[TraceRecord],
    *,
    vocab_size: int,
    max_model_len: int,
    tokens_per_hash: int = 16,
    output_scale: int = 8,
    min_output_tokens: int = 4,
    speedup: float = 1.0,
    seed: int = 0,
) -> Workload:
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
        requests.append(
            ReplayRequest((record.timestamp_ms - t0) / 1000 / speedup, prompt, max_tokens)
        )
    return Workload(requests, truncated)


def cached_fraction_bound(requests: list[ReplayRequest], block_size: int) -> float:
    """Upper bound on the cached prompt fraction: prompt tokens in full blocks that an
    earlier request of the workload already had (one infinite cache)."""
    from kvmesh.kv.block_hash import hash_blocks

    seen: set[int] = set()
    hits = total = 0
    for request in requests:
        hashes = hash_blocks(request.prompt_token_ids, block_size)  # chained: whole prefix
        hits += sum(h in seen for h in hashes)
        seen.update(hashes)
        total += len(request.prompt_token_ids)
    return hits * block_size / total if total else 0.0


def random_prompt(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]


def random_workload(
    vocab_size: int,
    seed: int,
    num_requests: int,
    prompt_lens: tuple[int, int],
    output_lens: tuple[int, int],
) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs, lengths uniform in the closed ranges."""
    rng = random.Random(seed)
    return [
        (random_prompt(rng, rng.randint(*prompt_lens), vocab_size), rng.randint(*output_lens))
        for _ in range(num_requests)
    ]


# --- sending: one streamed request, as the client sees it ---


@dataclass
class StreamRecord:
    """One streamed completion: when it was sent, when each chunk came and how many
    tokens it carried (perf_counter seconds), its text and usage, or its error."""

    sent: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)
    text: str = ""
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0][0] - self.sent

    @property
    def end(self) -> float:
        return self.chunks[-1][0]

    def token_gaps(self) -> list[float]:
        """Seconds between successive tokens; a chunk of n tokens splits its gap n ways."""
        gaps = []
        for (before, _), (at, n) in zip(self.chunks, self.chunks[1:], strict=False):
            gaps += [(at - before) / n] * n
        return gaps


def http_client(url: str) -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(
        base_url=url,
        timeout=600.0,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )


async def sse_events(http: httpx.AsyncClient, body: dict) -> AsyncIterator[dict]:
    """The JSON events of one streamed completion, until [DONE]; an error status raises
    APIError. Close it (contextlib.aclosing) to leave early: that closes the connection."""
    from kvmesh.client import COMPLETIONS, DONE, error_of, event_data

    async with http.stream("POST", COMPLETIONS, json=body) as response:
        if response.is_error:
            await response.aread()
            raise error_of(response)
        async for line in response.aiter_lines():
            data = event_data(line)
            if data is DONE:
                return
            if data is not None:
                yield data


async def stream_completion(
    http: httpx.AsyncClient,
    model: str,
    prompt: list[int],
    max_tokens: int,
    logprobs: bool = False,
    record: StreamRecord | None = None,
) -> StreamRecord:
    """Stream one greedy completion (EOS ignored) into `record` (a new one by default, or
    the caller's, to watch while it runs); failures land in record.error.

    Without logprobs a chunk counts one token if it has text (a token that completes no
    character sends nothing); with logprobs every token is sent and counted exactly."""
    import httpx

    from kvmesh.client import COMPLETIONS, APIError, chunk_deltas

    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if logprobs:
        body["logprobs"] = 0
    record = record or StreamRecord()
    record.sent = time.perf_counter()
    try:
        async with contextlib.aclosing(sse_events(http, body)) as events:
            async for data in events:
                now = time.perf_counter()
                for choice in chunk_deltas(COMPLETIONS, data):
                    n = (
                        len(choice.logprobs["tokens"])
                        if choice.logprobs
                        else int(bool(choice.text))
                    )
                    if n:
                        record.chunks.append((now, n))
                    record.text += choice.text
                    record.finish_reason = choice.finish_reason or record.finish_reason
                record.usage = data.get("usage") or record.usage
    except (APIError, httpx.HTTPError) as exc:
        record.error = str(exc) or repr(exc)
    if record.error is None and not record.chunks:
        record.error = "no tokens streamed"
    return record


async def replay(
    url: str, model: str, requests: list[ReplayRequest]
) -> tuple[list[StreamRecord], float]:
    """Send each request at its arrival time, open loop; also the worst send delay (s)."""
    async with http_client(url) as http:
        t0 = time.perf_counter() + 0.2
        lags = []

        async def send(request: ReplayRequest) -> StreamRecord:
            await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
            lags.append(time.perf_counter() - t0 - request.arrival_s)
            record = await stream_completion(
                http, model, request.prompt_token_ids, request.max_tokens
            )
            progress.advance()
            return record

        with Progress("replaying the trace (requests done)", total=len(requests)) as progress:
            records = await asyncio.gather(*(send(r) for r in requests))
    return records, max(lags)


async def send_all(
    url: str, model: str, workload: list[tuple[list[int], int]]
) -> list[StreamRecord]:
    """Every (prompt, output length) at once."""

    async def send(http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> StreamRecord:
        record = await stream_completion(http, model, prompt, max_tokens)
        progress.advance()
        return record

    async with http_client(url) as http:
        with Progress("sending (requests done)", total=len(workload)) as progress:
            return await asyncio.gather(*(send(http, p, n) for p, n in workload))


async def warm_up(url: str, model: str, vocab_size: int) -> list[StreamRecord]:
    """Short and long prompts, so local and remote prefill, on every worker (tokens
    unrelated to any workload): first steps load kernels and grow buffers.

    The first requests are staggered, each sent once the one before has its first token
    and still runs (so load steers the next elsewhere): a fresh frontend or decode worker
    connects to a peer on first use, and two requests racing to do that fail with
    "socket ... is already open" (a cluster bug this steps around)."""
    rng = random.Random("warm-up")
    lengths = (300, 1200, 300, 2500)
    async with http_client(url) as http:
        tasks, records = [], [StreamRecord() for _ in lengths]
        for n, record in zip(lengths, records, strict=True):
            tasks.append(
                asyncio.ensure_future(
                    stream_completion(
                        http, model, random_prompt(rng, n, vocab_size), 32, record=record
                    )
                )
            )
            while not (record.chunks or tasks[-1].done()):
                await asyncio.sleep(0.005)
        return records + await asyncio.gather(
            *tasks,
            *(
                stream_completion(http, model, random_prompt(rng, n, vocab_size), 8)
                for n in (40, 300, 1200, 2500)
            ),
        )


def stats(values: list[float], prefix: str) -> dict[str, float]:
    """Mean, p50, p99 and max of `values`, keyed `<prefix>_mean_s` and so on."""
    import numpy as np

    a = np.asarray(values)
    return {
        f"{prefix}_mean_s": float(a.mean()),
        f"{prefix}_p50_s": float(np.percentile(a, 50)),
        f"{prefix}_p99_s": float(np.percentile(a, 99)),
        f"{prefix}_max_s": float(a.max()),
    }


def summarize_replay(records: list[StreamRecord], requests: list[ReplayRequest]) -> dict:
    """TTFT, cached-token fraction and output rate of a replay, with per-request samples."""
    usage = [r.usage for r in records]
    prompt = sum(u["prompt_tokens"] for u in usage)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage]
    output = sum(u["completion_tokens"] for u in usage)
    t0 = min(r.sent for r in records)
    seconds = max(r.end for r in records) - t0
    ttft = [r.ttft for r in records]
    return {
        **stats(ttft, "ttft"),
        "e2e_mean_s": sum(r.end - r.sent for r in records) / len(records),
        "prompt_tokens": prompt,
        "cached_tokens": sum(cached),
        "cached_fraction": sum(cached) / prompt,
        "output_tokens": output,
        "short_outputs": [
            {
                "request": i,
                "max_tokens": r.max_tokens,
                "tokens": u["completion_tokens"],
                "prompt_tokens": u["prompt_tokens"],
                "finish_reason": records[i].finish_reason,
            }
            for i, (u, r) in enumerate(zip(usage, requests, strict=True))
            if u["completion_tokens"] != r.max_tokens
        ],
        "seconds": seconds,
        "output_tokens_per_s": output / seconds,
        "samples": {
            "sent_s": [round(r.sent - t0, 4) for r in records],
            "ttft_s": [round(t, 5) for t in ttft],
            "cached_tokens": cached,
        },
    }


async def decode_under_prefill(
    url: str,
    model: str,
    stream_prompts: list[list[int]],
    stream_tokens: int,
    long_prompts: list[list[int]],
    long_output: int,
    interval: float,
) -> tuple[list[StreamRecord], list[StreamRecord]]:
    """The decodes (logprobs on: every token is seen) start together; once each has its
    first token, a long prompt is sent every `interval` s until the last decode ends."""
    async with http_client(url) as http:
        streams = [StreamRecord() for _ in stream_prompts]
        decodes = [
            asyncio.ensure_future(
                stream_completion(http, model, p, stream_tokens, logprobs=True, record=s)
            )
            for p, s in zip(stream_prompts, streams, strict=True)
        ]
        while not all(s.chunks or d.done() for s, d in zip(streams, decodes, strict=True)):
            await asyncio.sleep(0.005)
        arrivals = []
        start = time.perf_counter()
        for i, prompt in enumerate(long_prompts):
            await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
            if i and all(d.done() for d in decodes):
                break
            arrivals.append(
                asyncio.ensure_future(stream_completion(http, model, prompt, long_output))
            )
        await asyncio.gather(*decodes)
        return streams, await asyncio.gather(*arrivals)


def summarize_decodes(streams: list[StreamRecord], longs: list[StreamRecord]) -> dict:
    """Inter-token latency and rate of the decodes; how many long prompts, their TTFT."""
    gaps = [g for s in streams for g in s.token_gaps()]
    seconds = max(s.end for s in streams) - min(s.sent for s in streams)
    return {
        **stats(gaps, "itl"),
        "decode_seconds": seconds,
        "decode_tokens_per_s": sum(s.usage["completion_tokens"] for s in streams) / seconds,
        "long_prompts_sent": len(longs),
        "long_prompt_tokens": sum(r.usage["prompt_tokens"] for r in longs),
        **{f"long_{k}": v for k, v in stats([r.ttft for r in longs], "ttft").items()},
        "samples": {"itl_s": [round(g, 6) for g in gaps]},
    }
