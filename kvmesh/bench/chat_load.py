"""One closed-loop chat client for any OpenAI server (kvmesh.bench.servers): seeded
messages of N one-token words, streamed with ignore_eos at temperature 0, at most C in
flight; what each reply took as aiperf counts it, and loud failure on an error, a reply of
other than max_tokens tokens, or servers that count the same prompts differently."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import click


@dataclass
class ChatRecord:
    """One streamed chat completion as the client saw it (perf_counter seconds)."""

    sent: float = 0.0
    first: float | None = None  # first chunk with content
    last: float | None = None  # last chunk with content
    text: str = ""
    usage: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage.get("completion_tokens", 0)

    @property
    def itl(self) -> float:
        return (self.last - self.first) / max(1, self.tokens - 1)


@dataclass
class Workload:
    """The chat messages every server gets, and what the Engine gets for them."""

    messages: list[str]
    prompt_ids: list[list[int]]  # each message under the chat template, tokenized
    max_tokens: int
    concurrency: int


def make_workload(
    model_dir: Path, num_requests: int, input_tokens: int, output_tokens: int, concurrency: int
) -> Workload:
    """Seeded messages of `input_tokens` words of the model's vocabulary (a word = one
    token that is a space and letters, so the message tokenizes to that many tokens)."""
    from kvmesh.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    words = [
        text
        for i in range(tokenizer.vocab_size)
        if len(text := tokenizer.decode([i])) > 2 and text[0] == " " and text[1:].isalpha()
    ]
    if not words:
        raise click.ClickException(f"{model_dir}: the tokenizer has no ' word' tokens")
    rng = random.Random(f"serve-peer-{input_tokens}")
    messages = ["".join(rng.choices(words, k=input_tokens)).lstrip() for _ in range(num_requests)]
    prompt_ids = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": m}]),
            add_special_tokens=False,
        )
        for m in messages
    ]
    return Workload(messages, prompt_ids, output_tokens, concurrency)


# --- the client ---


async def stream_chat(http, model: str, message: str, max_tokens: int) -> ChatRecord:
    import httpx

    from kvmesh.client import CHAT, APIError, chunk_deltas, error_of, event_data

    body = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record = ChatRecord(sent=time.perf_counter())
    try:
        async with http.stream("POST", CHAT, json=body) as response:
            if response.is_error:
                await response.aread()
                raise error_of(response)
            async for line in response.aiter_lines():
                data = event_data(line)
                if data is None or not isinstance(data, dict):
                    continue
                for choice in chunk_deltas(CHAT, data):
                    if choice.text:
                        record.last = time.perf_counter()
                        record.first = record.first or record.last
                        record.text += choice.text
                record.usage = data.get("usage") or record.usage
    except (APIError, httpx.HTTPError) as exc:
        record.error = str(exc) or repr(exc)
    if record.error is None and record.first is None:
        record.error = "no content streamed"
    return record


async def drive(url: str, model: str, messages: list[str], max_tokens: int, concurrency: int):
    """Every message, at most `concurrency` in flight; (records, round seconds)."""
    from kvmesh.bench.trace import http_client

    slots = asyncio.Semaphore(concurrency)

    async def one(message: str) -> ChatRecord:
        async with slots:
            return await stream_chat(http, model, message, max_tokens)

    async with http_client(url) as http:
        start = time.perf_counter()
        records = await asyncio.gather(*(one(m) for m in messages))
    return records, time.perf_counter() - start


def summarize(records: list[ChatRecord], seconds: float) -> dict:
    tokens = sum(r.tokens for r in records)
    return {
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds,
        "ttft_mean_s": sum(r.first - r.sent for r in records) / len(records),
        "itl_mean_s": sum(r.itl for r in records) / len(records),
    }


def check(records: list[ChatRecord], workload: Workload, server: str) -> int:
    """Fail on an error or a reply of other than max_tokens tokens; the prompt tokens."""
    failed = [r.error for r in records if r.error]
    if failed:
        raise click.ClickException(
            f"{server}: {len(failed)}/{len(records)} requests failed; first: {failed[0]}"
        )
    short = [(i, r.tokens) for i, r in enumerate(records) if r.tokens != workload.max_tokens]
    if short:
        raise click.ClickException(
            f"{server}: {len(short)} replies of other than {workload.max_tokens} tokens "
            f"(request, tokens): {short[:5]}"
        )
    return sum(r.usage.get("prompt_tokens", 0) for r in records)


def check_prompts(servers: dict) -> None:
    """Every server must have counted the same prompt tokens (same template, tokenizer)."""
    counts = {server: r["prompt_tokens"] for server, r in servers.items()}
    if len(set(counts.values())) > 1:
        raise click.ClickException(f"servers counted different prompt tokens: {counts}")
