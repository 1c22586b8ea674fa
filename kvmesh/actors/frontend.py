"""The frontend actor: the OpenAI HTTP server, backed by the cluster.

One asyncio loop runs both uvicorn (kvmesh.frontend.app) and this actor's sockets.
A request's life, in `generate`, with its state in one RequestState:

    place:   hash the prompt's (and any output's) blocks, ask the router for a Placement
             that avoids the workers this request saw die; send Generate to the decode
             worker (connecting on first use)
    stream:  turn the TokenBatches that worker streams back into Deltas; tokens from any
             other worker are dropped
    migrate: the worker dies (a watch on every peer) or refuses the Generate (request_refused):
             a coded StreamError (worker_died / refused) wakes the loop, which places the
             request again with the tokens and text already streamed, at most
             max_migrations times; the client's stream goes on as if nothing happened
    end:     a finish reason, or any other coded error raised as exception_of(error);
             a client that goes away, or request_timeout, sends Abort to the worker

Nothing branches on an error's words: only on StreamError.code.
Torch-free: this process starts in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import structlog

from kvmesh.actors.base import Actor, ActorConfig, PeerDeadError, RemoteError, Retry, any_peer
from kvmesh.frontend.backend import BackendUnavailable, OverloadedError, exception_of
from kvmesh.frontend.limits import HTTPLimits
from kvmesh.frontend.metrics import BackendMetrics, WorkerMetrics
from kvmesh.frontend.models import ModelFront, ServedModel
from kvmesh.kv.block_hash import hash_blocks, wire_hashes
from kvmesh.params import SamplingParams
from kvmesh.protocol import (
    Abort,
    CacheLoad,
    ClusterStatus,
    Counters,
    Delta,
    Generate,
    ModelControl,
    ModelQuery,
    ModelStates,
    Placement,
    RequestDone,
    RouteRequest,
    RouterLoad,
    StatusQuery,
    StreamErrorCode,
    Tier,
    TokenBatch,
    WorkerLoad,
)
from kvmesh.transport.keys import hash_key

log = structlog.get_logger(__name__)
MIGRATES = frozenset({StreamErrorCode.WORKER_DIED, StreamErrorCode.REFUSED})
GENERATE_BYTES_PER_TOKEN = 5  # MessagePack of a token id below 2**32
GENERATE_SLACK = 64 * 1024  # the rest of a Generate: parameters, stop strings, ids
ROUTER_RETRY = Retry((TimeoutError, ConnectionError), "router_unreachable")


@dataclass(frozen=True)
class FrontendSettings:
    models: tuple[ServedModel, ...]  # what it serves, the default (first) model first
    router_endpoint: str
    router_id: str | None = None  # the actor at router_endpoint (required with keys)
    hash_key: bytes | None = None  # the cluster's block-hash key; None: this user's
    host: str = "127.0.0.1"
    http_port: int = 8000
    max_num_requests: int = 1024  # in flight; beyond it requests get 429 + Retry-After
    max_migrations: int = 3  # moves of one request off dead decode workers
    request_timeout: float = 600.0  # seconds; a request still running then is aborted
    keep_alive: float = 30.0  # seconds an idle HTTP connection stays open
    limits: HTTPLimits = HTTPLimits()
    max_connections: int = 4096  # open HTTP connections; more are answered 503
    route_timeout: float = 10.0
    connect_timeout: float = 60.0
    status_interval: float = 0.5


@dataclass
class RequestState:
    """One request across the decode workers it runs on: what the frontend needs to
    stream it, and to place it again when its worker is lost.

    `worker` is the one worker whose tokens count (None between placements);
    `lost_workers` died under the request or refused it: its placements avoid them, and
    each one cost a migration.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: asyncio.Queue = field(default_factory=asyncio.Queue)  # Deltas for generate()
    output_token_ids: list[int] = field(default_factory=list)
    num_sent_chars: int = 0  # characters of text the client already has
    num_cached_tokens: int | None = None  # the first placement's: what the client is told
    worker: str | None = None
    lost_workers: list[str] = field(default_factory=list)
    finished: bool = False  # the stream ended on the worker's side: nothing to abort
    model: ModelFront | None = None  # whose workers run it; None: the default model
    adapter: str | None = None  # the model's LoRA adapter it runs through; None: the base

    def token_ids(self) -> list[int]:
        """What a placement computes: the prompt, then the outputs so far."""
        return self.prompt_token_ids + self.output_token_ids

    def advance(self, delta: Delta) -> Delta:
        """Record a Delta of tokens; return it as the client sees it (with the first
        placement's cached-token count, however often the request moved)."""
        self.output_token_ids += delta.new_token_ids
        self.num_sent_chars += len(delta.new_text)
        if self.num_cached_tokens is None:
            self.num_cached_tokens = delta.num_cached_tokens
        self.finished = delta.finish_reason is not None
        return msgspec.structs.replace(delta, num_cached_tokens=self.num_cached_tokens)

    def lose(self, worker: str, code: str, message: str) -> None:
        """`worker` died or refused the request: if it is the request's worker, take it
        off the request and wake the stream with a coded error. Any other worker is
        ignored, so a worker lost twice (refusing, then dying) costs one migration."""
        if worker != self.worker:
            return
        self.worker = None
        self.lost_workers.append(worker)
        self.stream.put_nowait(Delta.failed(self.request_id, code, message))

    def can_move(self, max_migrations: int) -> bool:
        """Whether one more placement is allowed: one migration per lost worker."""
        return len(self.lost_workers) <= max_migrations

    def generate_for(self, placement: Placement) -> Generate:
        """The Generate that starts (or resumes) the request on placement.decode; a
        resumed request is prefilled where it decodes."""
        resumed = bool(self.output_token_ids)
        return Generate(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            params=self.params,
            prefill=None if resumed else placement.prefill,
            prefill_endpoint=None if resumed else placement.prefill_endpoint,
            output_token_ids=list(self.output_token_ids),
            num_sent_chars=self.num_sent_chars,
            adapter=self.adapter or "",
        )


class FrontendActor(Actor):
    """HTTP in, Generate out; also the cluster Backend that kvmesh.frontend.app calls."""

    role = "frontend"
    drain_accepts = frozenset({TokenBatch})

    def __init__(self, config: ActorConfig, settings: FrontendSettings) -> None:
        super().__init__(config)
        self.settings = settings
        key = settings.hash_key if settings.hash_key is not None else hash_key(None)
        fronts = [ModelFront(served, key, self) for served in settings.models]
        self.models = {front.model_name: front for front in fronts}
        self.default = fronts[0]  # a request that names no model (and the Backend's own)
        self.model_name = self.default.model_name
        self.tokenizer = self.default.tokenizer
        self.max_model_len = self.default.max_model_len
        self.vocab_size = self.default.vocab_size
        self.router_id: str | None = None
        self.status: ClusterStatus | None = None
        self.requests: dict[str, RequestState] = {}  # in flight, by request id
        self.num_migrations = 0
        self._server = None
        self._http: asyncio.Task | None = None
        self.watch(lambda peer_id: peer_id == self.router_id, self._router_died)
        self.watch(any_peer, self._decode_died)

    # --- actor lifecycle ---

    async def setup(self) -> None:
        import uvicorn

        from kvmesh.frontend.admission import AdmissionCollector
        from kvmesh.frontend.app import create_app

        await self._connect_router()
        app = create_app(self, self.settings.limits, models=self.routes(), admin=self)
        admissions = [model.admission for model in self.models.values()]
        app.state.metrics.registry.register(AdmissionCollector(lambda: admissions))
        config = uvicorn.Config(
            app,
            host=self.settings.host,
            port=self.settings.http_port,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=self.settings.keep_alive,
            limit_concurrency=self.settings.max_connections,
        )
        self._server = uvicorn.Server(config)
        # uvicorn must not take SIGTERM/SIGINT for itself: they are the actor's, which
        # drains the streams in flight before telling uvicorn to exit.
        self._server.capture_signals = contextlib.nullcontext
        self._http = self.supervise("http", self._server.serve)
        self.supervise("poll_status", self._poll_status)
        self.endpoints["http"] = f"http://{self.settings.host}:{self.settings.http_port}"

    async def drain(self) -> None:
        """Stop taking HTTP requests; let the streams in flight finish."""
        while self.requests:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._server is not None:  # uvicorn exits on its own, closing its connections
            self._server.should_exit = True
            await asyncio.gather(self._http, return_exceptions=True)
        await super().close()

    async def _connect_router(self) -> None:
        self.router_id = await self.connect(
            "to_router",
            self.settings.router_endpoint,
            self.settings.connect_timeout,
            self.settings.router_id,
        )

    async def _router_died(self, peer_id: str) -> None:
        """Reconnect to the router's successor."""
        self.supervise("reconnect_router", self._connect_router, retry=ROUTER_RETRY)

    async def _poll_status(self) -> None:
        while True:
            try:
                self.status = await self.request(
                    self.router_id, StatusQuery(), timeout=self.settings.route_timeout
                )
            except (PeerDeadError, RemoteError, TimeoutError) as exc:
                log.warning("router_status_failed", error=str(exc))
                self.status = None
            await asyncio.sleep(self.settings.status_interval)

    # --- Backend ---

    def ready(self) -> bool:
        """Every model has its workers, a decode worker among them (but the models an
        operator unloaded)."""
        if self.status is None:
            return False
        unloaded = self.status.unloaded()
        return all(self.model_ready(name) for name in self.models if name not in unloaded)

    def model_ready(self, name: str) -> bool:
        if self.status is None:
            return False
        default = self.default.model_name
        workers = [
            a
            for a in self.status.actors
            if a.role in ("prefill", "decode") and (a.model or default) == name
        ]
        return len(workers) >= self.models[name].served.expected_workers and any(
            a.role == "decode" for a in workers
        )

    def routes(self) -> dict:
        """Every name a request may give: each model's, and "<model>:<adapter>" for
        each of its LoRA adapters."""
        return {
            name: route for front in self.models.values() for name, route in front.routes().items()
        }

    # --- the admin API (kvmesh.frontend.app) ---

    async def model_states(self) -> ModelStates:
        """Every model's state and workers, as the router has them."""
        return await self._ask_router(ModelQuery())

    async def control_model(self, name: str, action: str) -> ModelStates:
        """Load or unload a model (see protocol.ModelControl); KeyError for a model this
        frontend does not serve."""
        if name not in self.models:
            raise KeyError(name)
        return await self._ask_router(ModelControl(model=name, action=action))

    async def _ask_router(
        self, request, refused: str = "the router refused", refused_retry: float | None = None
    ):
        """The router's reply; BackendUnavailable when it is unreachable, does not answer
        (retry after 2 s), or refuses ("<refused>: <its reason>", retry after
        `refused_retry`)."""
        if self.router_id not in self.peers:
            raise BackendUnavailable("the router is unreachable", retry_after=2.0)
        try:
            return await self.request(self.router_id, request, timeout=self.settings.route_timeout)
        except RemoteError as exc:
            message = f"{refused}: {exc.error.message}"
            raise BackendUnavailable(message, retry_after=refused_retry) from exc
        except (PeerDeadError, TimeoutError) as exc:
            raise BackendUnavailable(f"the router did not answer: {exc}", retry_after=2.0) from exc

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        model: ModelFront | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream one request: place it, stream its worker's tokens, and when that worker
        dies or refuses it, place it again with what it already streamed (at most
        max_migrations times); the client's stream goes on as if nothing happened.
        `model`: whose workers run it (None: the default model's), through its LoRA
        `adapter` (None: the base model)."""
        if not self._accepting:
            raise BackendUnavailable("the frontend is shutting down", retry_after=1.0)
        if len(self.requests) >= self.settings.max_num_requests:
            raise OverloadedError(f"{len(self.requests)} requests in flight; try again shortly")
        model = model or self.default
        ticket = await model.admission.acquire(params.priority)  # may wait; 429 when full
        if not self._accepting:
            ticket.release()
            raise BackendUnavailable("the frontend is shutting down", retry_after=1.0)
        state = RequestState(request_id, prompt_token_ids, params, model=model, adapter=adapter)
        self.requests[request_id] = state
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        try:
            await self._start(state)
            while not state.finished:
                delta = await self._next(state, deadline)
                if delta.error is None:
                    yield state.advance(delta)
                elif delta.error.code in MIGRATES and state.can_move(self.settings.max_migrations):
                    self.log.warning(
                        "request_migrating",
                        request_id=request_id,
                        dead=state.lost_workers[-1],
                        num_outputs=len(state.output_token_ids),
                    )
                    self.num_migrations += 1
                    await self._start(state)
                else:
                    state.finished = True  # the worker ended it, or never had it
                    raise exception_of(delta.error)
        finally:
            ticket.release()
            self.requests.pop(request_id, None)
            if not state.finished and state.worker in self.peers:
                await self.send(state.worker, Abort(request_id=request_id))
            if self.router_id in self.peers:
                await self.send(self.router_id, RequestDone(request_id=request_id))

    async def _next(self, state: RequestState, deadline: float) -> Delta:
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(state.stream.get(), max(left, 0.0))
        except TimeoutError:
            raise OverloadedError(
                f"request {state.request_id} took longer than frontend.request_timeout "
                f"({self.settings.request_timeout:g} s) and was aborted",
                retry_after=5.0,
            ) from None

    async def _start(self, state: RequestState) -> None:
        """Place the request (avoiding its lost workers) and send it to its decode worker."""
        # a Generate past the message size limit would be refused unread by the worker
        # (no request id to answer with): refuse it here, naming the limit
        num_tokens = len(state.prompt_token_ids) + len(state.output_token_ids)
        size = GENERATE_BYTES_PER_TOKEN * num_tokens + GENERATE_SLACK
        if size > self.config.max_message_size:
            raise ValueError(
                f"prompt has {len(state.prompt_token_ids)} tokens, too many for one message "
                f"to a worker (about {size} bytes; the limit is {self.config.max_message_size})"
            )
        placement = await self._place(state)
        state.worker = placement.decode
        await self._ensure_connected(placement.decode, placement.decode_endpoint)
        await self.send(placement.decode, state.generate_for(placement))

    async def _place(self, state: RequestState) -> Placement:
        if self.router_id not in self.peers:
            raise BackendUnavailable("the router is unreachable", retry_after=2.0)
        token_ids = state.token_ids()
        model = state.model or self.default
        salt = state.params.salted(model.salt_for(state.adapter))
        hashes = wire_hashes(hash_blocks(token_ids, model.block_size, salt=salt))
        if not state.lost_workers:  # its first placement: a request, not a migration
            model.reuse.observe(hashes)
        request = RouteRequest(
            request_id=state.request_id,
            block_hashes=hashes,
            num_prompt_tokens=len(token_ids),
            exclude=list(state.lost_workers),
            salt_id=model.salt_id,
            model=model.model_name,
            adapter=state.adapter or "",
        )
        return await self._ask_router(request, refused="no placement", refused_retry=2.0)

    async def _ensure_connected(self, worker: str, endpoint: str) -> None:
        try:
            await self.ensure_connected(worker, endpoint, self.settings.connect_timeout)
        except (TimeoutError, ConnectionError, ValueError) as exc:
            raise BackendUnavailable(f"decode worker {worker} unreachable: {exc}") from exc

    async def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        if state.worker in self.peers:
            await self.send(state.worker, Abort(request_id=request_id))
        state.stream.put_nowait(Delta.failed(request_id, StreamErrorCode.ABORTED, "aborted"))

    def metrics(self) -> BackendMetrics:
        """The cluster as the router's last status has it: each worker's load, the decode
        workers' remote prefills and KV bytes, the tiers' counters summed per tier."""
        workers: list[WorkerMetrics] = []
        caches: list[CacheLoad] = []
        router = None
        actors = self.status.actors if self.status else []
        for actor in actors:
            if isinstance(actor.load, WorkerLoad):
                workers.append(WorkerMetrics(actor.actor_id, actor.role, actor.load))
            elif isinstance(actor.load, CacheLoad):
                caches.append(actor.load)
            elif isinstance(actor.load, RouterLoad):
                router = actor.load
        decodes = [w.load for w in workers if w.role == "decode"]
        return BackendMetrics(
            remote_prefill_total=sum(load.remote_prefills_total for load in decodes),
            kv_transfer_bytes_total=sum(load.transfer_bytes_total for load in decodes),
            migrations_total=self.num_migrations,
            reusable_tokens_total=sum(m.reuse.reusable_tokens for m in self.models.values()),
            workers_alive=sum(1 for a in actors if a.role in ("prefill", "decode")),
            workers_expected=sum(m.served.expected_workers for m in self.models.values()),
            router=router,
            workers=workers,
            tiers=sum_tiers(cache.tiers for cache in caches),
            onboards=sum_tiers(w.load.tiers for w in workers),
        )

    # --- from the workers ---

    async def on_token_batch(self, msg: TokenBatch, inbound) -> None:
        """One step's tokens for some of our requests (only those placed on the sender)."""
        for delta in msg.deltas:
            state = self.requests.get(delta.request_id)
            if state is None:
                continue
            if state.worker != inbound.peer:
                self.log.warning(
                    "tokens_refused",
                    request_id=delta.request_id,
                    sender=inbound.peer,
                    reason="not placed on the sender",
                )
                continue
            state.stream.put_nowait(delta)

    def request_refused(self, error, inbound) -> None:
        """A decode worker refused a Generate (draining, or it no longer knows us): the
        request never started there, so it moves on as from a dead worker."""
        state = self.requests.get(error.request_id)
        if state is not None:
            message = f"decode worker {inbound.peer} refused it ({error.code}: {error.message})"
            state.lose(inbound.peer, StreamErrorCode.REFUSED, message)

    async def _decode_died(self, peer_id: str) -> None:
        """A decode worker died: its requests move elsewhere (or end with an error)."""
        for state in list(self.requests.values()):
            state.lose(peer_id, StreamErrorCode.WORKER_DIED, f"decode worker {peer_id} died")


C = TypeVar("C", bound=Counters)


def sum_tiers(per_actor: Iterable[dict[Tier, C]]) -> dict[Tier, C]:
    """Per tier, the counters of several actors added up field by field."""
    totals: dict[Tier, C] = {}
    for tiers in per_actor:
        for tier, counters in tiers.items():
            totals[tier] = totals[tier] + counters if tier in totals else counters
    return totals
