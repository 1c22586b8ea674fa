"""Backend: what the HTTP frontend needs from whatever runs the model.

The frontend validates, tokenizes and formats; a Backend turns prompt token ids into a
stream of Deltas. LocalBackend wraps one AsyncEngine in this process; the cluster
backend (router + prefill/decode workers) implements the same protocol, so the HTTP
layer never knows which one it talks to.

Torch-free at import: LocalBackend imports the engine only in `from_pretrained`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kvmesh.frontend.metrics import BackendMetrics, WorkerMetrics
from kvmesh.params import SamplingParams
from kvmesh.protocol import Delta, StreamError, StreamErrorCode
from kvmesh.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvmesh.engine.async_engine import AsyncEngine


class OverloadedError(Exception):
    """The backend is full right now; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(Exception):
    """The backend cannot serve at all (not started, engine dead, no workers)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def exception_of(error: StreamError) -> Exception:
    """The exception generate() raises for a stream that ended with `error`: the one
    place a StreamErrorCode gets its meaning for the HTTP layer (see serving.describe_error)."""
    code = error.code
    if code in (StreamErrorCode.INVALID_REQUEST, StreamErrorCode.REQUEST_ID_IN_USE):
        return ValueError(error.message)  # 400
    if code in (StreamErrorCode.WORKER_DIED, StreamErrorCode.REFUSED, StreamErrorCode.ABORTED):
        return BackendUnavailable(error.message, retry_after=1.0)  # 503: a retry may land well
    if code == StreamErrorCode.ENGINE_DEAD:
        return BackendUnavailable(error.message)  # 503, no retry: this engine is gone
    return RuntimeError(f"{code}: {error.message}")  # a code this frontend does not know: 500


class Backend(Protocol):
    """Runs requests for the frontend.

    generate() raises ValueError for a request the model cannot take (the message names
    the field), OverloadedError when full and BackendUnavailable when it cannot serve;
    these may surface at the first iteration. A stream that ends with a coded StreamError
    raises exception_of(error). Leaving the iteration early ends the request; abort()
    ends it from outside.

    metrics() returns what /metrics serves of the backend (kvmesh.frontend.metrics).
    """

    model_name: str
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    default_priority: int  # of a request that names none

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def metrics(self) -> BackendMetrics: ...


class LocalBackend:
    """One AsyncEngine in this process: the single-process server (`kvmesh serve`).

    Admission: at most `max_num_requests` requests in flight (queued or running);
    beyond that generate() raises OverloadedError instead of queueing without bound.
    """

    def __init__(
        self, engine: AsyncEngine, model_name: str | None = None, max_num_requests: int = 1024
    ) -> None:
        self.engine = engine
        config = engine.config
        self.model_name = model_name or Path(config.path).name
        self.tokenizer = engine.tokenizer
        self.max_model_len = config.max_model_len
        self.vocab_size = config.vocab_size
        self.default_priority = 0
        self.max_num_requests = max_num_requests
        self.num_requests = 0
        self.started = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        num_blocks: int | None = None,
        model_name: str | None = None,
        threads: int | None = None,
        **engine_kwargs,
    ) -> LocalBackend:
        """Load the model (this imports torch) into an AsyncEngine, not yet started, whose
        thread computes with `threads` torch threads (None: torch's choice)."""
        from kvmesh.engine.async_engine import AsyncEngine
        from kvmesh.engine.engine import Engine

        engine = Engine.from_pretrained(
            path, device=device, dtype=dtype, num_blocks=num_blocks, **engine_kwargs
        )
        return cls(AsyncEngine(engine, threads=threads), model_name=model_name)

    async def start(self) -> None:
        self.engine.start()
        self.started = True

    async def close(self) -> None:
        await self.engine.close()

    def ready(self) -> bool:
        engine = self.engine
        alive = engine.thread is not None and engine.thread.is_alive()
        return self.started and alive and engine.error is None and not engine.stopping

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        from kvmesh.engine.async_engine import EngineDeadError

        if not self.started:
            raise BackendUnavailable("the engine is not started")
        if self.num_requests >= self.max_num_requests:
            raise OverloadedError(f"{self.num_requests} requests in flight; try again shortly")
        self.num_requests += 1
        try:
            async for out in self.engine.generate(prompt_token_ids, params, request_id):
                yield out.delta()
        except EngineDeadError as error:
            dead = StreamError(code=StreamErrorCode.ENGINE_DEAD, message=str(error))
            raise exception_of(dead) from error
        finally:
            self.num_requests -= 1

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def metrics(self) -> BackendMetrics:
        return BackendMetrics(workers=[WorkerMetrics("local", "local", self.engine.stats())])
