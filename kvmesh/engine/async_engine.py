"""AsyncEngine: an Engine stepping on its own thread, driven from asyncio.

Actors and the HTTP frontend live in an asyncio loop; the engine's step is blocking
compute. One engine thread owns the Engine: asyncio callers never touch it directly
but queue commands (add, abort) that the thread applies between steps, and the
thread hands each step's outputs back to the loop, one asyncio.Queue per request.

    loop thread:   generate() ──cmd──►  engine thread: apply cmds, step(), step() …
                   queue.get() ◄──outputs (call_soon_threadsafe)──┘

What the loop reads of the engine between commands is a value the engine thread handed
over: the scheduler's stats after the last step, and (with on_step) the device prefix
cache as the steps' KV events told it, which prefetch_hashes() reads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import structlog

from kvmesh.engine.engine import Engine, RemotePrefillTask, RequestOutput
from kvmesh.engine.prefetch import DevicePrefix
from kvmesh.engine.scheduler import SchedulerStats
from kvmesh.params import SamplingParams
from kvmesh.protocol import KVEvent, WorkerLoad

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass
class StepResult:
    """What one engine step produced, for a worker actor's on_step callback."""

    outputs: list[RequestOutput]
    remote_prefills: list[RemotePrefillTask]
    kv_events: list[KVEvent]
    load: WorkerLoad  # Engine.load() after the step


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    """The load the event loop can read of the engine between its steps (the in-process
    server's /metrics): WorkerLoad's fields that need neither the engine thread nor a
    worker actor, by the same names."""

    num_running: int
    num_waiting: int
    kv_usage: float
    preemptions_total: int


class EngineDeadError(RuntimeError):
    """The engine thread stopped (crashed or closed); requests in flight cannot finish."""


class AsyncEngine:
    """Streams RequestOutputs of an Engine that runs on a dedicated thread."""

    def __init__(
        self,
        engine: Engine,
        on_step: Callable[[StepResult], None] | None = None,
        on_crash: Callable[[BaseException], None] | None = None,
        threads: int | None = None,
    ) -> None:
        """With `on_step`, every step's outputs, new remote-prefill tasks and KV events
        go to that callback (on the event loop) instead of per-request streams.
        `on_crash` is called (on the event loop) if the engine thread dies of an error.
        `threads`: torch's intra-op threads for the engine thread (None: torch's choice)."""
        self.engine = engine
        self.threads = threads
        self.on_step = on_step
        self.on_crash = on_crash
        self.emitted: list[RequestOutput] = []  # outputs of commands, for the next on_step
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.streams: dict[str, asyncio.Queue] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.wakeup = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        # handed from the engine thread to the loop after each step:
        self._stats: tuple[SchedulerStats, float] = (engine.scheduler.stats(), engine.pool.usage)
        self.device_prefix = DevicePrefix()  # loop side, from each StepResult's KV events

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    async def close(self) -> None:
        """Stop the engine thread; every open stream ends with EngineDeadError."""
        self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step, the last one finished.

        Bad input raises ValueError before anything is queued (an unknown adapter
        included; AdapterBusyError when max_loras adapters are all in use). Leaving the
        iteration early (a client went away) aborts the request.
        """
        if self.error is not None or self.stopping:
            raise EngineDeadError(f"engine is not running: {self.error or 'closed'}")
        stream: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = self.loop.create_future()
        self.streams[request_id] = stream
        self._submit(lambda: self._add(prompt, params, request_id, adapter, added))
        finished = False
        try:
            await added
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if self.streams.pop(request_id, None) is not None and not finished:
                self._submit(lambda: self.engine.abort_request(request_id))

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends without a final output."""
        stream = self.streams.pop(request_id, None)
        self._submit(lambda: self.engine.abort_request(request_id))
        if stream is not None:
            stream.put_nowait(EngineDeadError(f"request {request_id} was aborted"))

    def call(self, fn: Callable[[Engine], T]) -> asyncio.Future[T]:
        """Run fn(engine) on the engine thread between steps; await its result."""
        future = self.loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                self.loop.call_soon_threadsafe(_settle, future, exc)
            else:
                self.loop.call_soon_threadsafe(_settle_result, future, result)

        self._submit(command)
        return future

    def emit(self, output: RequestOutput) -> None:
        """From a command on the engine thread: deliver `output` with the next on_step,
        ahead of the outputs of steps that come after the command (order preserved)."""
        self.emitted.append(output)

    def stats(self) -> EngineStats:
        """The scheduler's counts and the pool's use after the engine's last step."""
        stats, kv_usage = self._stats
        return EngineStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_usage=kv_usage,
            preemptions_total=stats.num_preemptions,
        )

    def prefetch_hashes(
        self, token_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> list[int]:
        """The full blocks of a request about to be added (through LoRA `adapter`) that a
        KV connector may hand it: those past the prefix the device caches (as of the last
        step, with on_step), for a prefetch to ask the tiers for. ValueError for a prompt
        the engine refuses."""
        hashes = self.engine.prefix_hashes(token_ids, params, adapter)
        return hashes[self.device_prefix.num_leading(hashes) :]

    # --- engine thread ---

    def _submit(self, command: Callable[[], None]) -> None:
        self.commands.put(command)
        self.wakeup.set()

    def _add(self, prompt, params, request_id, adapter, added: asyncio.Future) -> None:
        try:
            self.engine.add_request(prompt, params, request_id, adapter=adapter)
        except ValueError as exc:
            self.loop.call_soon_threadsafe(_settle, added, exc)
            self.streams.pop(request_id, None)
        else:
            self.loop.call_soon_threadsafe(_settle, added, None)

    def _run(self) -> None:
        try:
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            while not self.stopping:
                while not self.commands.empty():
                    self.commands.get()()
                if not self.engine.has_unfinished():
                    self._publish([])
                    self.wakeup.wait()
                    self.wakeup.clear()
                    continue
                self._publish(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting stream
            log.exception("engine_thread_crashed")
            self.error = exc
            if self.on_crash is not None:
                self.loop.call_soon_threadsafe(self.on_crash, exc)
        finally:
            reason = EngineDeadError(f"engine stopped: {self.error or 'closed'}")
            self.loop.call_soon_threadsafe(self._fail_all, reason)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._stats = (self.engine.scheduler.stats(), self.engine.pool.usage)
        if self.on_step is None:
            if outputs:
                self.loop.call_soon_threadsafe(self._deliver, outputs)
            return
        if self.emitted:
            outputs, self.emitted = self.emitted + outputs, []
        result = StepResult(
            outputs,
            self.engine.take_remote_prefills(),
            self.engine.take_kv_events(),
            self.engine.load(),
        )
        self.loop.call_soon_threadsafe(self._stepped, result)

    # --- loop thread ---

    def _stepped(self, result: StepResult) -> None:
        self.device_prefix.apply(result.kv_events)
        self.on_step(result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in self.streams.values():
            stream.put_nowait(error)


def _settle_result(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
