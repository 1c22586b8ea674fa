"""VllmWorker: a decode worker whose engine is vLLM (model.engine = "vllm").

The same actor contract as kvmesh's DecodeWorker, so frontend and router cannot tell
them apart: it registers with the router (block size, blocks, the cluster's hash salt),
takes Generate/Abort from frontends, streams TokenBatches back, and publishes KV events
and LoadReports on its events socket:

    frontend ──Generate──► VllmWorker ──AsyncLLM.generate──► vLLM EngineCore (child process)
    frontend ◄──TokenBatch── VllmWorker ◄──outputs─────────────┘
    router   ◄──KVEvents, LoadReport── VllmWorker ◄──ZeroMQ KV events (vLLM's hashes)──┘

vLLM's events name blocks by vLLM's hashes; VllmEventTranslator renames them by
kvmesh's (the frontend's) so the router's index works as for kvmesh workers. It serves
aggregated only: no remote prefill, no host/disk tiers (config.book refuses those).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvmesh.actors.base import Actor, ActorConfig, PeerDeadError, RemoteError, Retry, any_peer
from kvmesh.actors.load_reports import LoadReports
from kvmesh.engine.vllm_engine import VllmEngine, VllmSettings
from kvmesh.engine.vllm_events import BlockSizeMismatch, VllmEventTranslator
from kvmesh.protocol import (
    UNLOADED_EXIT,
    Abort,
    Delta,
    Generate,
    LoadReport,
    RegisterWorker,
    StreamErrorCode,
    TokenBatch,
    UnloadModel,
)

log = structlog.get_logger(__name__)

ROUTER_RETRY = Retry((TimeoutError, ConnectionError, RemoteError), "router_unreachable")


@dataclass(frozen=True)
class VllmWorkerSettings:
    """What a vLLM worker needs beyond ActorConfig (roles.init_worker fills it)."""

    engine: VllmSettings
    model_name: str
    endpoint: str  # our ROUTER, for frontends
    events_endpoint: str  # our PUB, for the router
    router_endpoint: str
    salt: bytes  # the cluster's block-hash salt, as the frontend hashes
    router_id: str | None = None
    load_report_interval: float = 0.5
    connect_timeout: float = 60.0
    pool: str = ""  # its [[pools]] entry, if any


def vllm_events_endpoint(actor_id: str) -> str:
    """Where this worker's vLLM publishes its KV events: private to this host."""
    return f"ipc://{tempfile.gettempdir()}/kvmesh-vllm-{actor_id}-{os.getpid()}.kv"


class VllmWorker(Actor):
    """A decode worker running vLLM's AsyncLLM in its own event loop."""

    role = "decode"

    def __init__(self, config: ActorConfig, settings: VllmWorkerSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.engine: VllmEngine | None = None
        self.router_id: str | None = None
        self.frontend_of: dict[str, str] = {}  # request id -> frontend actor id
        self.requests: dict[str, asyncio.Task] = {}
        self.translator = VllmEventTranslator(settings.engine.block_size, settings.salt)
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self._zmq: zmq.asyncio.Context | None = None
        self._outbox: dict[str, list[Delta]] = {}  # frontend -> this step's deltas
        self.watch(any_peer, self._frontend_died)
        self.watch(lambda peer_id: peer_id == self.router_id, self._router_died)

    async def setup(self) -> None:
        self.engine = await asyncio.to_thread(VllmEngine.build, self.settings.engine)
        self.open("from_peers", zmq.ROUTER, self.settings.endpoint, bind=True)
        self.open("events_out", zmq.PUB, self.settings.events_endpoint, bind=True)
        self._zmq = zmq.asyncio.Context()
        from_vllm = self._zmq.socket(zmq.SUB)
        from_vllm.setsockopt(zmq.SUBSCRIBE, b"")
        from_vllm.connect(self.settings.engine.events_endpoint)
        await self._join_router()
        self.supervise("relay_kv_events", self._relay_kv_events, from_vllm)
        self.supervise("report_load", self._report_load)

    async def _join_router(self) -> None:
        s = self.settings
        self.router_id = await self.connect(
            "to_router", s.router_endpoint, s.connect_timeout, s.router_id
        )
        from kvmesh.kv.block_hash import salt_id

        await self.request(
            self.router_id,
            RegisterWorker(
                model=s.model_name,
                block_size=s.engine.block_size,
                num_blocks=self.engine.num_blocks,
                max_num_seqs=s.engine.max_num_seqs,
                events_endpoint=self.endpoints["events_out"],
                salt_id=salt_id(s.salt),
                pool=s.pool,
                role=self.role,
            ),
            timeout=s.connect_timeout,
        )

    async def _router_died(self, peer_id: str) -> None:
        """Keep trying to register with the router's successor."""
        self.supervise("rejoin_router", self._join_router, retry=ROUTER_RETRY)

    # --- requests ---

    async def on_generate(self, msg: Generate, inbound) -> None:
        """Run a request on vLLM and stream its Deltas to the frontend that sent it."""
        if msg.request_id in self.frontend_of:
            delta = Delta.failed(
                msg.request_id,
                StreamErrorCode.REQUEST_ID_IN_USE,
                f"request id {msg.request_id!r} is already running here",
            )
            await self.send(inbound.peer, TokenBatch(deltas=[delta]))
            return
        if msg.prefill is not None:
            delta = Delta.failed(
                msg.request_id,
                StreamErrorCode.INVALID_REQUEST,
                "vLLM workers prefill locally; this one takes no prefill worker",
            )
            await self.send(inbound.peer, TokenBatch(deltas=[delta]))
            return
        self.frontend_of[msg.request_id] = inbound.peer
        task = asyncio.create_task(self._run(msg, inbound.peer), name=msg.request_id)
        self.requests[msg.request_id] = task
        task.add_done_callback(lambda _: self.requests.pop(msg.request_id, None))

    async def _run(self, msg: Generate, frontend: str) -> None:
        request_id = msg.request_id
        try:
            stream = self.engine.generate(
                request_id, msg.prompt_token_ids, msg.params, msg.output_token_ids
            )
            async for delta in stream:
                if delta.finish_reason is not None:
                    self.frontend_of.pop(request_id, None)
                    self.prompt_tokens_total += delta.num_prompt_tokens
                    self.cached_tokens_total += delta.num_cached_tokens
                self._queue(frontend, delta)
        except ValueError as exc:  # vLLM refused it (too long, bad parameter)
            self._queue(
                frontend, Delta.failed(request_id, StreamErrorCode.INVALID_REQUEST, str(exc))
            )
        finally:
            self.frontend_of.pop(request_id, None)

    def _queue(self, frontend: str, delta: Delta) -> None:
        """One TokenBatch per frontend per engine step, as kvmesh's workers send: vLLM
        hands a step's outputs to every request's stream at once, so the requests woken
        in this loop iteration all queue theirs before the flush runs, in the next."""
        outbox = self._outbox.get(frontend)
        if outbox is None:
            self._outbox[frontend] = [delta]
            asyncio.get_running_loop().call_soon(self._flush, frontend)
        else:
            outbox.append(delta)

    def _flush(self, frontend: str) -> None:
        self.supervise("stream", self._stream, frontend, self._outbox.pop(frontend))

    async def _stream(self, frontend: str, deltas: list[Delta]) -> None:
        try:
            await self.send(frontend, TokenBatch(deltas=deltas))
        except PeerDeadError:
            for delta in deltas:
                if delta.finish_reason is None and delta.error is None:
                    await self._abort(delta.request_id)

    async def on_abort(self, msg: Abort, inbound) -> None:
        """The client went away: stop the request (only its own frontend may)."""
        if self.frontend_of.get(msg.request_id) == inbound.peer:
            await self._abort(msg.request_id)

    async def _abort(self, request_id: str) -> None:
        self.frontend_of.pop(request_id, None)
        task = self.requests.pop(request_id, None)
        if task is not None:
            task.cancel()  # closes the generate() stream, which aborts it in vLLM
        await self.engine.abort(request_id)

    async def _frontend_died(self, peer_id: str) -> None:
        """A frontend died: its requests have nobody to stream to."""
        for request_id, frontend in list(self.frontend_of.items()):
            if frontend == peer_id:
                await self._abort(request_id)

    # --- events and load ---

    async def _relay_kv_events(self, from_vllm: zmq.asyncio.Socket) -> None:
        """vLLM's KV events (frames: topic, sequence number, payload), renamed by
        kvmesh's hashes, out to the router."""
        try:
            while True:
                frames = await from_vllm.recv_multipart()
                try:
                    events = self.translator.translate(frames[-1])
                except BlockSizeMismatch as exc:
                    self.log.error("kv_events_refused", error=str(exc))
                    return
                for event in events:
                    await self.emit("events_out", event)
        finally:
            from_vllm.close(linger=0)

    async def _report_load(self) -> None:
        reports = LoadReports(self.load_report, self.settings.load_report_interval)
        await reports.run(lambda report: self.emit("events_out", report))

    def load_report(self) -> LoadReport:
        return LoadReport(
            load=msgspec.structs.replace(
                self.engine.load(),
                prompt_tokens_total=self.prompt_tokens_total,
                cached_tokens_total=self.cached_tokens_total,
            )
        )

    async def on_unload_model(self, msg: UnloadModel, inbound) -> None:
        """The router unloaded our model: drain, then exit as unloaded (our launcher
        keeps this worker stopped until the model is loaded again)."""
        self.log.info("model_unloaded_exiting", model=msg.model, router=inbound.peer)
        self.exit_code = UNLOADED_EXIT
        self.stop()

    async def drain(self) -> None:
        """Finish what is in flight."""
        while self.requests:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.cancel_supervised()
        for task in list(self.requests.values()):
            task.cancel()
        if self.engine is not None:  # blocks for seconds: heartbeats go on meanwhile
            await asyncio.to_thread(self.engine.shutdown)
        if self._zmq is not None:
            self._zmq.term()
        await super().close()


def init_vllm_worker(cfg, config: ActorConfig, worker) -> VllmWorker:
    """The vLLM worker of `worker` (roles.init_worker's WorkerSettings for this actor);
    ConfigError naming the package to install when vLLM is not importable here."""
    from kvmesh.config import ConfigError
    from kvmesh.config.vllm_args import install_hint, vllm_installed
    from kvmesh.gpu.model_config import ModelConfig

    if not vllm_installed():
        raise ConfigError(
            f'model.engine = "vllm" but vllm is not importable by this Python: '
            f"{install_hint(worker.device)}",
            key="model.engine",
        )
    engine = VllmSettings(
        model_path=worker.model_path,
        dtype=worker.dtype,
        block_size=worker.block_size,
        max_model_len=worker.max_model_len,
        max_num_seqs=worker.max_num_seqs,
        max_num_batched_tokens=worker.max_num_batched_tokens,
        events_endpoint=vllm_events_endpoint(config.actor_id),
        device=worker.device,
        threads=worker.threads,
        extra=dict(cfg.model_named(worker.model_name).vllm),
    )
    model = ModelConfig.from_pretrained(worker.model_path)
    settings = VllmWorkerSettings(
        engine=engine,
        model_name=worker.model_name,
        pool=worker.pool,
        endpoint=worker.endpoint,
        events_endpoint=worker.events_endpoint,
        router_endpoint=worker.router_endpoint,
        router_id=worker.router_id,
        salt=model.kv_salt(worker.dtype, worker.block_size, worker.hash_key),
        connect_timeout=worker.connect_timeout,
    )
    return VllmWorker(config, settings)
