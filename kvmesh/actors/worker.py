"""Prefill and decode workers: an Engine on its own thread behind an actor.

Life of a disaggregated request (README, Architecture; decode first):

    frontend ──Generate(prefill=P)──► decode D: admit, allocate the prompt's blocks
                                       (reusing D's prefix cache), park the prompt
    D ──RemotePrefill(blocks)──► prefill P: compute the prompt (P's own prefix cache
                                  helps), sample the first token, hold the blocks
    P ══KV blocks (data plane: shm / zmq / ucx)══► D's blocks; KvWrite/KvWriteDone
    P ──RemotePrefillDone(first token)──► D: resume the prompt as a running decode
    D ──TokenBatch (one per step per frontend)──► frontend

Without `prefill` in Generate, the decode worker prefills locally. When the prefill
worker fails (dead, timeout, error) the prompt is computed locally instead.
Both roles publish their KV events and LoadReports on their events socket (a report
when their load changes, else a keep-alive: kvmesh.actors.load_reports).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
import structlog
import zmq

from kvmesh.actors.base import Actor, ActorConfig, PeerDeadError, RemoteError, Retry, any_peer
from kvmesh.actors.cache import CacheClient
from kvmesh.actors.load_reports import LoadReports
from kvmesh.engine.async_engine import AsyncEngine, StepResult
from kvmesh.engine.engine import Engine, RemotePrefillTask, RequestOutput
from kvmesh.engine.mock import MockTiming, build_mock_engine
from kvmesh.engine.prefetch import Prefetch
from kvmesh.kv.block_hash import wire_hashes
from kvmesh.params import SamplingParams, first_token_params
from kvmesh.protocol import (
    UNLOADED_EXIT,
    Abort,
    CacheSnapshot,
    CacheSnapshotQuery,
    Delta,
    Generate,
    KvPoolQuery,
    KvWrite,
    LoadReport,
    RegisterWorker,
    RemotePrefill,
    RemotePrefillDone,
    StreamErrorCode,
    TokenBatch,
    UnloadModel,
    WorkerLoad,
)
from kvmesh.transport.dataplane import (
    DataPlaneHandlers,
    KVDataPlane,
    KVLayout,
    allocate_shared_pool,
)

log = structlog.get_logger(__name__)

CACHE_ATTACH_WAIT = 10.0  # seconds setup waits for the cache actor before serving without
ROUTER_RETRY = Retry((TimeoutError, ConnectionError, RemoteError), "router_unreachable")
CACHE_RETRY = Retry(
    (TimeoutError, ConnectionError, RemoteError, OSError, ValueError), "cache_unreachable"
)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs beyond ActorConfig; `kvmesh actor` fills it from cluster.toml."""

    model_path: str
    model_name: str
    endpoint: str  # our ROUTER, for frontends and peers
    events_endpoint: str  # our PUB, for the router
    router_endpoint: str
    router_id: str | None = None  # the actor at router_endpoint (required with keys)
    hash_key: bytes | None = None  # the cluster's block-hash key; None: this user's
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    transfer: str = "auto"
    cache_id: str | None = None  # the node's cache actor (host and disk KV tiers), if any
    cache_endpoint: str | None = None
    load_report_interval: float = 0.5
    max_model_len: int = 0  # cap on prompt + output tokens; 0 = the model's context
    remote_prefill_timeout: float = 120.0
    connect_timeout: float = 60.0
    threads: int | None = None  # torch threads of the engine thread; None: torch's choice
    engine: str = "kvmesh"  # model.engine: "mock" runs kvmesh.engine.mock's MockEngine
    pool: str = ""  # its [[pools]] entry, if any
    adapters: Mapping[str, str] = field(default_factory=dict)  # LoRA name -> PEFT directory
    max_loras: int = 4  # adapters loaded at once
    mock_timing: MockTiming | None = None  # the mock's step times; None: its defaults


class EngineWorker(Actor):
    """What prefill and decode workers share: the engine, registration, events, load."""

    drain_accepts = frozenset({Abort, KvPoolQuery, KvWrite})

    def __init__(self, config: ActorConfig, settings: WorkerSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.kv_plane: KVDataPlane | None = None
        self.router_id: str | None = None
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.remote_prefills_total = 0
        self.transfer_bytes_total = 0
        self._events: asyncio.Queue = asyncio.Queue()  # KV events and load reports, in order
        self.load = WorkerLoad()  # the engine's, after its last step
        self.load_reports = LoadReports(self.load_report, settings.load_report_interval)
        self.cache: CacheClient | None = None  # set while building the engine, if any
        self.cache_error = ""  # why the last attach to the cache actor failed
        self.watch(lambda peer_id: peer_id == self.router_id, self._router_died)

    async def setup(self) -> None:
        engine, segment = await asyncio.to_thread(self._build_engine)
        self.engine = AsyncEngine(
            engine,
            on_step=self._on_step,
            on_crash=self._on_engine_crash,
            threads=self.settings.threads,
        )
        self.engine.start()
        self.kv_plane = KVDataPlane(
            self,
            engine.kv_caches,
            segment=segment,
            backend=self.settings.transfer,
            node=self.config.node,
        )
        DataPlaneHandlers(self.kv_plane).register(self)
        self.open("from_peers", zmq.ROUTER, self.settings.endpoint, bind=True)
        self.open("events_out", zmq.PUB, self.settings.events_endpoint, bind=True)
        if self.cache is not None:  # usually up already (it starts first); else later
            self.watch(self.cache.cache_id, self._cache_died)
            attach = self.supervise("attach_cache", self._attach_cache, retry=CACHE_RETRY)
            await asyncio.wait([attach], timeout=CACHE_ATTACH_WAIT)
        await self._join_router()
        self.supervise("publish_events", self._publish_events)
        self.supervise("report_load", self._report_load)

    async def _join_router(self) -> None:
        self.router_id = await self.connect(
            "to_router",
            self.settings.router_endpoint,
            self.settings.connect_timeout,
            self.settings.router_id,
        )
        await self._register()

    async def _register(self, role_switch: bool = False) -> None:
        engine = self.engine.engine
        await self.request(
            self.router_id,
            RegisterWorker(
                model=self.settings.model_name,
                block_size=engine.block_size,
                num_blocks=engine.num_blocks,
                max_num_seqs=engine.scheduler.max_num_seqs,
                events_endpoint=self.endpoints["events_out"],
                salt_id=engine.salt_id,
                pool=self.settings.pool,
                role=self.role,
                role_switch=role_switch,
            ),
            timeout=self.settings.connect_timeout,
        )

    async def on_unload_model(self, msg: UnloadModel, inbound) -> None:
        """The router unloaded our model: drain, then exit as unloaded (our launcher
        keeps this worker stopped until the model is loaded again)."""
        self.log.info("model_unloaded_exiting", model=msg.model, router=inbound.peer)
        self.exit_code = UNLOADED_EXIT
        self.stop()

    async def on_cache_snapshot_query(self, msg: CacheSnapshotQuery, inbound) -> CacheSnapshot:
        """The router (re)learns what this worker's device prefix cache holds: asked
        once this worker's events reach it after a registration, so a restarted router
        routes on the blocks cached before it came back."""
        device = await self.engine.call(lambda e: wire_hashes(e.pool.cached))
        self.log.info("device_blocks_announced", router=inbound.peer, num_blocks=len(device))
        return CacheSnapshot(device=device)

    async def _router_died(self, peer_id: str) -> None:
        """Keep trying to register with the router's successor."""
        self.supervise("rejoin_router", self._rejoin_router, retry=ROUTER_RETRY)

    async def _rejoin_router(self) -> None:
        await self._join_router()
        self.log.info("reregistered", router=self.router_id)

    async def _cache_died(self, peer_id: str) -> None:
        """No tiers until the cache actor's successor is attached."""
        self.cache.detach()
        await self.engine.call(lambda e: e.kv_connector.detach())
        self.supervise("attach_cache", self._attach_cache, retry=CACHE_RETRY)

    def _build_engine(self) -> tuple[Engine, object]:
        if self.settings.engine == "mock":  # no weights, no shared pool, no tiers
            return build_mock_engine(self.settings), None
        from kvmesh.gpu.kv_cache import default_num_blocks
        from kvmesh.gpu.loader import load_model, torch_dtype
        from kvmesh.gpu.model_config import ModelConfig
        from kvmesh.tokenizer import Tokenizer

        s = self.settings
        config = ModelConfig.from_pretrained(s.model_path)
        dtype = torch_dtype(s.dtype)
        model = load_model(s.model_path, s.device, s.dtype)  # first: the pool takes what is left
        num_blocks = s.num_blocks or default_num_blocks(
            config, s.block_size, dtype, s.device, s.max_num_seqs * config.max_model_len
        )
        kv_caches = segment = None
        if s.device == "cpu":  # a shared-memory pool, so same-host peers write straight in
            layout = KVLayout(
                config.num_layers,
                num_blocks,
                s.block_size,
                config.num_kv_heads,
                config.head_dim,
                dtype,
            )
            kv_caches, segment = allocate_shared_pool(layout, self.actor_id)
        engine = Engine(
            model,
            Tokenizer.from_pretrained(s.model_path),
            config,
            device=s.device,
            dtype=s.dtype,
            block_size=s.block_size,
            num_blocks=num_blocks,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_caches=kv_caches,
            kv_connector=self._tiers(config, dtype),
            max_model_len=s.max_model_len or None,
            hash_key=s.hash_key,
            adapters=dict(s.adapters),
            max_loras=s.max_loras,
        )
        warm_up(engine)
        return engine, segment

    def _tiers(self, config, dtype):
        """The connector to the node's cache actor (attached once the actor runs)."""
        s = self.settings
        if s.cache_id is None:
            return None
        from kvmesh.engine.kv_connector import CacheActorConnector

        record_bytes = config.kv_record_bytes(s.block_size, dtype.itemsize)
        self.cache = CacheClient(self, s.cache_id, s.cache_endpoint)
        return CacheActorConnector(record_bytes, self.cache)

    async def _attach_cache(self) -> None:
        """Map the node's host tier and hand it to the connector on the engine thread
        (supervised with CACHE_RETRY: retried until the cache actor answers; meanwhile
        every lookup misses and nothing is offloaded)."""
        record_bytes = self.engine.engine.kv_connector.record_bytes
        try:
            host = await self.cache.attach(record_bytes, CACHE_ATTACH_WAIT)
        except CACHE_RETRY.errors as exc:
            self.cache_error = str(exc)  # for the router's status, until attached
            raise
        self.cache_error = ""
        await self.engine.call(lambda e: e.kv_connector.attach(host))
        self.log.info("cache_attached", cache=self.settings.cache_id, slots=host.num_slots)

    async def prefetch(
        self, token_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> Prefetch | None:
        """The node's tiers' run for a request's blocks past the device's cached prefix,
        asked here, on the event loop, before the engine admits it: admission never waits
        on the cache actor (kvmesh.engine.prefetch). None without a cache actor."""
        if self.cache is None:
            return None
        try:
            hashes = self.engine.prefetch_hashes(token_ids, params, adapter)
        except ValueError:
            return None  # add_request refuses it, naming the field
        return await self.cache.prefetch(hashes)

    async def drain(self) -> None:
        """Leave the router first, so new work goes to other workers (a placement made
        just before is refused, and its frontend moves it); then finish what is in
        flight: wait until the engine has nothing left to run."""
        if self.router_id is not None:
            load = self.load
            self.log.info(
                "leaving_router",
                router=self.router_id,
                in_flight=load.num_running + load.num_waiting + load.num_remote,
            )
            await self.leave(self.router_id)
        while self.engine is not None and self.engine.engine.has_unfinished():
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.cancel_supervised()  # they call the engine and the data plane
        if self.engine is not None:
            await self.engine.close()
        if self.kv_plane is not None:
            await self.kv_plane.close()
        await super().close()

    # --- engine side ---

    def _on_step(self, result: StepResult) -> None:
        for event in result.kv_events:
            self._events.put_nowait(event)
        changed = _queues(result.load) != _queues(self.load)
        self.load = result.load
        for out in result.outputs:
            if out.finished:
                self.prompt_tokens_total += len(out.prompt_token_ids)
                self.cached_tokens_total += out.num_cached_tokens
        if changed:  # the router's next decision should not see a finished request's load
            report = self.load_report()
            self._events.put_nowait(report)
            self.load_reports.published(report)
        self.handle_outputs(result.outputs)
        for task in result.remote_prefills:
            self.supervise("remote_prefill", self.remote_prefill, task)

    def _on_engine_crash(self, error: BaseException) -> None:
        # Crash-only: a worker without an engine must not look alive. Exiting stops its
        # heartbeats, so frontends migrate its requests and the launcher restarts it.
        self.log.error("engine_crashed_exiting", error=repr(error))
        os._exit(70)

    def handle_outputs(self, outputs: list[RequestOutput]) -> None:
        """Role-specific: what to do with a step's outputs."""

    async def remote_prefill(self, task: RemotePrefillTask) -> None:
        """Role-specific: decode workers send parked prompts to a prefill worker."""

    async def _publish_events(self) -> None:
        while True:
            event = await self._events.get()
            await self.emit("events_out", event)

    async def _report_load(self) -> None:
        await self.load_reports.run(lambda report: self.emit("events_out", report))

    def load_report(self) -> LoadReport:
        """The engine's last load with this worker's totals."""
        return LoadReport(
            load=msgspec.structs.replace(
                self.load,
                prompt_tokens_total=self.prompt_tokens_total,
                cached_tokens_total=self.cached_tokens_total,
                remote_prefills_total=self.remote_prefills_total,
                transfer_bytes_total=self.transfer_bytes_total,
            ),
            unreachable=self.unreachable(),
        )

    def unreachable(self) -> list[str]:
        """The peers this worker needs and cannot reach now, each with why: its node's
        cache actor while it is not attached (`kvmesh status` shows the worker unhealthy)."""
        if self.cache is None or self.cache.attached:
            return []
        s = self.settings
        why = self.cache_error or "not attached yet"
        return [f"{s.cache_id} at {s.cache_endpoint} (this node's cache actor): {why}"]


def _queues(load: WorkerLoad) -> tuple[int, int, int]:
    return load.num_running, load.num_waiting, load.num_remote


class DecodeWorker(EngineWorker):
    """Runs requests to completion and streams their tokens to the frontends."""

    role = "decode"

    def __init__(self, config: ActorConfig, settings: WorkerSettings) -> None:
        super().__init__(config, settings)
        self.frontend_of: dict[str, str] = {}  # request id -> frontend actor id
        self.prefill_of: dict[str, tuple[str, str]] = {}  # request id -> (worker, endpoint)
        self.watch(any_peer, self._frontend_died)

    async def on_generate(self, msg: Generate, inbound) -> None:
        """Admit a request; remotely prefilled when the router named a prefill worker."""
        owner = self.frontend_of.get(msg.request_id)
        if owner is not None:  # a request id is its frontend's: never take over another's
            self.log.warning(
                "generate_refused",
                request_id=msg.request_id,
                by=inbound.peer,
                owner=owner,
                reason="request id in use",
            )
            delta = Delta.failed(
                msg.request_id,
                StreamErrorCode.REQUEST_ID_IN_USE,
                f"request id {msg.request_id!r} is already running here",
            )
            await self.send(inbound.peer, TokenBatch(deltas=[delta]))
            return
        self.frontend_of[msg.request_id] = inbound.peer
        remote = msg.prefill is not None
        if remote:
            self.prefill_of[msg.request_id] = (msg.prefill, msg.prefill_endpoint)
        resume = (msg.output_token_ids, msg.num_sent_chars) if msg.output_token_ids else None
        adapter = msg.adapter or None
        token_ids = msg.prompt_token_ids + msg.output_token_ids
        prefetched = await self.prefetch(token_ids, msg.params, adapter)
        if self.frontend_of.get(msg.request_id) != inbound.peer:
            return  # aborted (or its frontend died) while the lookup ran
        try:
            await self.engine.call(
                lambda e: e.add_request(
                    msg.prompt_token_ids,
                    msg.params,
                    msg.request_id,
                    remote_prefill=remote,
                    resume_from=resume,
                    prefetched=prefetched,
                    adapter=adapter,
                )
            )
        except ValueError as exc:
            self.frontend_of.pop(msg.request_id, None)
            self.prefill_of.pop(msg.request_id, None)
            delta = Delta.failed(msg.request_id, StreamErrorCode.INVALID_REQUEST, str(exc))
            await self.send(inbound.peer, TokenBatch(deltas=[delta]))

    async def on_abort(self, msg: Abort, inbound) -> None:
        """The client went away: stop the request and free its blocks (only the frontend
        that sent the request may)."""
        owner = self.frontend_of.get(msg.request_id)
        if owner != inbound.peer:
            if owner is not None:
                self.log.warning(
                    "abort_refused", request_id=msg.request_id, by=inbound.peer, owner=owner
                )
            return
        await self._abort(msg.request_id)

    async def _abort(self, request_id: str) -> None:
        self.frontend_of.pop(request_id, None)
        self.prefill_of.pop(request_id, None)
        await self.engine.call(lambda e: e.abort_request(request_id))

    async def _frontend_died(self, peer_id: str) -> None:
        """A frontend died: its requests have nobody to stream to."""
        for request_id, frontend in list(self.frontend_of.items()):
            if frontend == peer_id:
                await self._abort(request_id)

    def handle_outputs(self, outputs: list[RequestOutput]) -> None:
        batches: dict[str, list[Delta]] = {}
        for out in outputs:
            frontend = self.frontend_of.get(out.request_id)
            if frontend is None:
                continue
            if out.finished:
                del self.frontend_of[out.request_id]
            batches.setdefault(frontend, []).append(out.delta())
        for frontend, deltas in batches.items():
            self.supervise("stream", self._stream, frontend, deltas)

    async def _stream(self, frontend: str, deltas: list[Delta]) -> None:
        try:
            await self.send(frontend, TokenBatch(deltas=deltas))
        except PeerDeadError:
            for delta in deltas:
                await self._abort(delta.request_id)

    async def remote_prefill(self, task: RemotePrefillTask) -> None:
        request_id = task.request_id
        worker, endpoint = self.prefill_of.pop(request_id, (None, None))
        self.kv_plane.grant(worker, request_id, task.block_ids)  # its KvWrites, ours alone
        try:
            await self.ensure_connected(worker, endpoint, self.settings.connect_timeout)
            done = await self.request(
                worker,
                RemotePrefill(
                    request_id=request_id,
                    prompt_token_ids=task.prompt_token_ids,
                    params=task.params,
                    num_cached_tokens=task.num_cached_tokens,
                    block_ids=task.block_ids,
                    adapter=task.adapter or "",
                ),
                timeout=self.settings.remote_prefill_timeout,
            )
        except (PeerDeadError, RemoteError, TimeoutError, ConnectionError, ValueError) as exc:
            self.log.warning(
                "remote_prefill_failed", request_id=request_id, prefill=worker, error=str(exc)
            )
            await self.engine.call(lambda e: e.fail_remote_prefill(request_id))
            return
        finally:
            self.kv_plane.revoke(worker, request_id)
        self.remote_prefills_total += 1
        self.transfer_bytes_total += done.num_bytes
        # The first token must reach the frontend before the tokens of later steps: it
        # goes out with the next step's outputs, in the engine thread's own order.
        try:
            await self.engine.call(
                lambda e: self.engine.emit(
                    e.complete_remote_prefill(request_id, done.token_id, done.logprobs)
                )
            )
        except KeyError:
            return  # aborted while the prefill ran


class PrefillWorker(EngineWorker):
    """Computes prompts for decode workers and writes their KV into the decode pool."""

    role = "prefill"

    def __init__(self, config: ActorConfig, settings: WorkerSettings) -> None:
        super().__init__(config, settings)
        self.first_token: dict[str, asyncio.Future] = {}
        self.requester_of: dict[str, str] = {}
        self.watch(any_peer, self._requester_died)

    async def on_remote_prefill(self, msg: RemotePrefill, inbound) -> RemotePrefillDone:
        """Compute the prompt, write its KV into the requester's blocks, then answer."""
        request_id = msg.request_id
        params = first_token_params(msg.params)
        # before the request is registered: should the requester die meanwhile, the
        # request still runs and is released when its write fails, as after any death
        adapter = msg.adapter or None
        prefetched = await self.prefetch(msg.prompt_token_ids, params, adapter)
        future = asyncio.get_running_loop().create_future()
        self.first_token[request_id] = future
        self.requester_of[request_id] = inbound.peer
        try:
            await self.engine.call(
                lambda e: e.add_request(
                    msg.prompt_token_ids,
                    params,
                    request_id,
                    hold_blocks=True,
                    prefetched=prefetched,
                    adapter=adapter,
                )
            )
            out = await future
        finally:
            self.first_token.pop(request_id, None)
            self.requester_of.pop(request_id, None)
        try:
            held = await self.engine.call(lambda e: e.held_block_ids(request_id))
            start = msg.num_cached_tokens // self.settings.block_size
            await self.kv_plane.write(inbound.peer, request_id, held[start:], msg.block_ids[start:])
        finally:
            await self.engine.call(lambda e: e.release(request_id))
        num_bytes = self.kv_plane.layout.packed_bytes(
            len(msg.block_ids) - start, self.kv_plane.layout.num_layers
        )
        self.remote_prefills_total += 1
        self.transfer_bytes_total += num_bytes
        logprobs = out.logprobs[0] if out.logprobs else None
        return RemotePrefillDone(
            request_id=request_id, token_id=out.token_ids[0], logprobs=logprobs, num_bytes=num_bytes
        )

    def handle_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            future = self.first_token.get(out.request_id)
            if out.finished and future is not None and not future.done():
                future.set_result(out)

    async def _requester_died(self, peer_id: str) -> None:
        """A decode worker died: drop the prompts it was waiting for."""
        for request_id, requester in list(self.requester_of.items()):
            if requester == peer_id:
                await self.engine.call(lambda e, r=request_id: e.abort_request(r))
                future = self.first_token.get(request_id)
                if future is not None and not future.done():
                    future.set_exception(PeerDeadError(peer_id, "requester died"))


def warm_up(engine: Engine) -> None:
    """Compile the kernels (Numba) before serving: a first compile holds the GIL for a
    second or more, long enough for peers to miss heartbeats. Leaves no trace."""
    engine.generate([[engine.config.bos_token_id or 0] * 3], SamplingParams(max_tokens=2))
    engine.pool.reset_prefix_cache()
    engine.take_kv_events()
