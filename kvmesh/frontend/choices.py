"""ChoiceStreams: the backend requests behind one HTTP request, merged into one stream.

An HTTP request asks for n choices of each of its prompts; each choice is one backend
request, `<response id>-<choice index>`. One pump task per choice moves its Deltas into
a shared queue, so the response sees them in arrival order whichever choice they
belong to:

    backend.generate(id-0) ──pump──┐
    backend.generate(id-1) ──pump──┼──► queue ──► start(): the first Delta of every choice
    ...                            ┘              deltas(): all of them, applied to Choices

start() waits for every choice's first Delta so that whatever the backend refuses
before the first token (bad prompt, overload, no workers) is raised while the HTTP
status can still say so. close() must always run: it cancels the pumps and aborts every
unfinished choice on the backend (the client left, or another choice failed).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import anyio

from kvmesh.frontend.backend import Backend, BackendUnavailable
from kvmesh.frontend.metrics import Metrics
from kvmesh.params import SamplingParams
from kvmesh.protocol import Delta


class Choice:
    """What one choice has produced so far."""

    def __init__(self, index: int, request_id: str, num_prompt_tokens: int) -> None:
        self.index = index
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.last_token_at: float | None = None


class ChoiceStreams:
    """Runs one backend request per choice and merges their Deltas."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.arrived = time.monotonic()
        self.choices = [Choice(i, f"{request_id}-{i}", len(ids)) for i, ids in enumerate(prompts)]
        self.queue: asyncio.Queue[tuple[Choice, Delta | Exception]] = asyncio.Queue()
        self.head: deque[tuple[Choice, Delta | Exception]] = deque()
        self.num_unfinished = len(self.choices)
        self.closed = False
        metrics.requests_running.inc()
        self.pumps = [
            asyncio.create_task(self._pump(c, backend.generate(c.request_id, ids, p)))
            for c, ids, p in zip(self.choices, prompts, params, strict=True)
        ]

    async def _pump(self, choice: Choice, stream: AsyncIterator[Delta]) -> None:
        finished = False
        try:
            async for delta in stream:
                self.queue.put_nowait((choice, delta))
                finished = delta.finish_reason is not None
        except Exception as error:  # noqa: BLE001 - handed to the reader, which raises it
            self.queue.put_nowait((choice, error))
            return
        if not finished:
            error = BackendUnavailable(f"request {choice.request_id} ended before finishing")
            self.queue.put_nowait((choice, error))

    async def start(self) -> None:
        """Wait until every choice has a first Delta; raise the first error instead."""
        waiting = {c.index for c in self.choices}
        while waiting:
            choice, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            self.head.append((choice, item))
            waiting.discard(choice.index)

    async def deltas(self) -> AsyncIterator[tuple[Choice, Delta]]:
        """Every Delta until all choices finish, each already applied to its Choice."""
        while self.num_unfinished:
            choice, item = self.head.popleft() if self.head else await self.queue.get()
            if isinstance(item, Exception):
                raise item
            self._apply(choice, item)
            yield choice, item

    async def collect(self) -> None:
        async for _ in self.deltas():
            pass

    def _apply(self, choice: Choice, delta: Delta) -> None:
        now = time.monotonic()
        num_new = len(delta.new_token_ids)
        if num_new:
            if choice.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - self.arrived)
            else:
                gap = (now - choice.last_token_at) / num_new
                for _ in range(num_new):
                    self.metrics.inter_token_latency.observe(gap)
            choice.last_token_at = now
        choice.text += delta.new_text
        choice.token_ids += delta.new_token_ids
        if delta.new_logprobs is not None:
            choice.logprobs += delta.new_logprobs
        choice.num_cached_tokens = delta.num_cached_tokens
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            self.num_unfinished -= 1
            self.metrics.observe_finished(
                choice.num_prompt_tokens, choice.num_cached_tokens, len(choice.token_ids)
            )

    async def close(self) -> None:
        """Cancel the pumps and abort every unfinished choice; safe to call twice.

        Shielded: it runs when the client has gone, inside a cancelled scope."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            for task in self.pumps:
                task.cancel()
            await asyncio.gather(*self.pumps, return_exceptions=True)
            for choice in self.choices:
                if choice.finish_reason is None:
                    await self.backend.abort(choice.request_id)
            self.metrics.requests_running.dec()
