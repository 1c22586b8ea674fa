"""The frontend actor: the OpenAI HTTP server, backed by the cluster.

One asyncio loop runs both uvicorn (kvmesh.frontend.app) and this actor's sockets.
For each request: hash the prompt's blocks, ask the router for a Placement, send
Generate to the decode worker (connecting on first use), and turn the TokenBatches it
streams back into Deltas. A client that goes away sends Abort; a decode worker that
dies ends its requests with an error (request migration is the cache/fault issue's).
Torch-free: this process starts in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import structlog

from kvmesh.actors.base import Actor, ActorConfig, PeerDeadError, RemoteError
from kvmesh.frontend.backend import BackendUnavailable, OverloadedError
from kvmesh.frontend.limits import HTTPLimits
from kvmesh.gpu.model_config import ModelConfig, capped_context
from kvmesh.kv.block_hash import hash_blocks, salt_id, wire_hashes
from kvmesh.params import SamplingParams
from kvmesh.protocol import (
    Abort,
    ClusterStatus,
    Delta,
    Generate,
    Placement,
    RequestDone,
    RouteRequest,
    StatusQuery,
    TokenBatch,
)
from kvmesh.tokenizer import Tokenizer
from kvmesh.transport.keys import hash_key

log = structlog.get_logger(__name__)
WORKER_DIED = "unavailable: died:"
GENERATE_BYTES_PER_TOKEN = 5  # MessagePack of a token id below 2**32
GENERATE_SLACK = 64 * 1024  # the rest of a Generate: parameters, stop strings, ids


@dataclass(frozen=True)
class FrontendSettings:
    model_path: str
    model_name: str
    block_size: int
    router_endpoint: str
    router_id: str | None = None  # the actor at router_endpoint (required with keys)
    hash_key: bytes | None = None  # the cluster's block-hash key; None: this user's
    dtype: str = "float32"  # the workers' KV dtype: part of every block hash
    host: str = "127.0.0.1"
    http_port: int = 8000
    expected_workers: int = 1  # /health is 200 once this many workers registered
    max_num_requests: int = 1024  # in flight; beyond it requests get 429 + Retry-After
    max_migrations: int = 3  # moves of one request off dead decode workers
    request_timeout: float = 600.0  # seconds; a request still running then is aborted
    keep_alive: float = 30.0  # seconds an idle HTTP connection stays open
    max_model_len: int = 0  # cap on prompt + output tokens; 0 = the model's context
    limits: HTTPLimits = HTTPLimits()
    max_connections: int = 4096  # open HTTP connections; more are answered 503
    route_timeout: float = 10.0
    connect_timeout: float = 60.0
    status_interval: float = 0.5


class FrontendActor(Actor):
    """HTTP in, Generate out; also the cluster Backend that kvmesh.frontend.app calls."""

    role = "frontend"
    drain_accepts = frozenset({TokenBatch})

    def __init__(self, config: ActorConfig, settings: FrontendSettings) -> None:
        super().__init__(config)
        self.settings = settings
        model = ModelConfig.from_pretrained(settings.model_path)
        self.model_name = settings.model_name
        self.tokenizer = Tokenizer.from_pretrained(settings.model_path)
        self.max_model_len = capped_context(model.max_model_len, settings.max_model_len)
        self.vocab_size = model.vocab_size
        key = settings.hash_key if settings.hash_key is not None else hash_key(None)
        self.salt = model.kv_salt(settings.dtype, settings.block_size, key)
        self.salt_id = salt_id(self.salt)
        self.router_id: str | None = None
        self.status: ClusterStatus | None = None
        self.streams: dict[str, asyncio.Queue] = {}
        self.decode_of: dict[str, str] = {}  # request id -> decode worker
        self._server = None
        self._services: list[asyncio.Task] = []

    # --- actor lifecycle ---

    async def setup(self) -> None:
        import uvicorn

        from kvmesh.frontend.app import create_app

        self.router_id = await self.connect(
            "to_router",
            self.settings.router_endpoint,
            self.settings.connect_timeout,
            self.settings.router_id,
        )
        config = uvicorn.Config(
            create_app(self, self.settings.limits),
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
        self._services = [
            asyncio.create_task(self._server.serve()),
            asyncio.create_task(self._poll_status()),
        ]
        self.endpoints["http"] = f"http://{self.settings.host}:{self.settings.http_port}"

    async def drain(self) -> None:
        """Stop taking HTTP requests; let the streams in flight finish."""
        while self.streams:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        server, *others = self._services or [None]
        for task in others:
            task.cancel()
        await asyncio.gather(*self._services, return_exceptions=True)
        await super().close()

    async def _reconnect_router(self) -> None:
        while self._accepting:
            try:
                await self.connect(
                    "to_router",
                    self.settings.router_endpoint,
                    self.settings.connect_timeout,
                    self.settings.router_id,
                )
                return
            except (TimeoutError, ConnectionError) as exc:
                log.warning("router_unreachable", error=str(exc))
                await asyncio.sleep(1.0)

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
        if self.status is None:
            return False
        workers = [a for a in self.status.actors if a.role in ("prefill", "decode")]
        return len(workers) >= self.settings.expected_workers and any(
            a.role == "decode" for a in workers
        )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[Delta]:
        """Stream one request. When its decode worker dies, the request moves to another
        (up to max_migrations times) with the tokens and text it already streamed, and
        the client's stream goes on as if nothing happened."""
        if not self._accepting:
            raise BackendUnavailable("the frontend is shutting down", retry_after=1.0)
        if len(self.streams) >= self.settings.max_num_requests:
            raise OverloadedError(f"{len(self.streams)} requests in flight; try again shortly")
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = stream
        outputs: list[int] = []
        num_chars = 0
        dead: list[str] = []
        num_cached = None
        finished = False
        decode = None
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        try:
            while not finished:
                decode = await self._start(
                    request_id, prompt_token_ids, params, outputs, num_chars, dead
                )
                while True:
                    delta: Delta = await self._next(stream, deadline, request_id)
                    if (
                        delta.error is not None
                        and delta.error.startswith(WORKER_DIED)
                        and (len(dead) < self.settings.max_migrations)
                    ):
                        dead.append(decode)
                        self.log.warning(
                            "request_migrating",
                            request_id=request_id,
                            dead=decode,
                            num_outputs=len(outputs),
                        )
                        break
                    if delta.error is not None:
                        finished = True
                        raise _as_error(delta.error)
                    outputs += delta.new_token_ids
                    num_chars += len(delta.new_text)
                    num_cached = delta.num_cached_tokens if num_cached is None else num_cached
                    finished = delta.finish_reason is not None
                    yield msgspec.structs.replace(delta, num_cached_tokens=num_cached)
                    if finished:
                        break
        finally:
            self.streams.pop(request_id, None)
            self.decode_of.pop(request_id, None)
            if not finished and decode in self.peers:
                await self.send(decode, Abort(request_id=request_id))
            if self.router_id in self.peers:
                await self.send(self.router_id, RequestDone(request_id=request_id))

    async def _next(self, stream: asyncio.Queue, deadline: float, request_id: str) -> Delta:
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(stream.get(), max(left, 0.0))
        except TimeoutError:
            raise OverloadedError(
                f"request {request_id} took longer than frontend.request_timeout "
                f"({self.settings.request_timeout:g} s) and was aborted",
                retry_after=5.0,
            ) from None

    async def _start(self, request_id, prompt_token_ids, params, outputs, num_chars, dead) -> str:
        """Place the request (avoiding dead workers) and send it to its decode worker."""
        # a Generate past the message size limit would be refused unread by the worker
        # (no request id to answer with): refuse it here, naming the limit
        size = GENERATE_BYTES_PER_TOKEN * (len(prompt_token_ids) + len(outputs)) + GENERATE_SLACK
        if size > self.config.max_message_size:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, too many for one message to a "
                f"worker (about {size} bytes; the limit is {self.config.max_message_size})"
            )
        placement = await self._place(
            request_id, prompt_token_ids + outputs, params.salted(self.salt), dead
        )
        decode = placement.decode
        self.decode_of[request_id] = decode
        await self._ensure_connected(decode, placement.decode_endpoint)
        resumed = bool(outputs)  # a resumed request is prefilled where it decodes
        await self.send(
            decode,
            Generate(
                request_id=request_id,
                prompt_token_ids=prompt_token_ids,
                params=params,
                prefill=None if resumed else placement.prefill,
                prefill_endpoint=None if resumed else placement.prefill_endpoint,
                output_token_ids=outputs,
                num_sent_chars=num_chars,
            ),
        )
        return decode

    async def _place(
        self, request_id: str, prompt_token_ids: list[int], salt: bytes, exclude: list[str]
    ) -> Placement:
        if self.router_id not in self.peers:
            raise BackendUnavailable("the router is unreachable", retry_after=2.0)
        hashes = wire_hashes(hash_blocks(prompt_token_ids, self.settings.block_size, salt=salt))
        try:
            return await self.request(
                self.router_id,
                RouteRequest(
                    request_id=request_id,
                    block_hashes=hashes,
                    num_prompt_tokens=len(prompt_token_ids),
                    exclude=exclude,
                    salt_id=self.salt_id,
                ),
                timeout=self.settings.route_timeout,
            )
        except RemoteError as exc:
            raise BackendUnavailable(f"no placement: {exc.error.message}", retry_after=2.0) from exc
        except (PeerDeadError, TimeoutError) as exc:
            raise BackendUnavailable(f"the router did not answer: {exc}", retry_after=2.0) from exc

    async def _ensure_connected(self, worker: str, endpoint: str) -> None:
        try:
            await self.ensure_connected(worker, endpoint, self.settings.connect_timeout)
        except (TimeoutError, ConnectionError, ValueError) as exc:
            raise BackendUnavailable(f"decode worker {worker} unreachable: {exc}") from exc

    async def abort(self, request_id: str) -> None:
        decode = self.decode_of.get(request_id)
        stream = self.streams.pop(request_id, None)
        if decode in self.peers:
            await self.send(decode, Abort(request_id=request_id))
        if stream is not None:
            stream.put_nowait(
                Delta(request_id=request_id, new_token_ids=[], new_text="", error="aborted")
            )

    def metrics(self) -> dict:
        workers, caches = [], []
        remote_prefills = transfer_bytes = 0
        for actor in self.status.actors if self.status else []:
            if actor.role == "cache":
                caches.append(actor.load)
            if actor.role not in ("prefill", "decode"):
                continue
            workers.append({"worker": actor.actor_id, "role": actor.role, **actor.load})
            if actor.role == "decode":
                remote_prefills += int(actor.load.get("remote_prefills_total", 0))
                transfer_bytes += int(actor.load.get("transfer_bytes_total", 0))
        return {
            "remote_prefill_total": remote_prefills,
            "kv_transfer_bytes_total": transfer_bytes,
            "workers": workers,
            "tiers": sum_tiers(workers + caches),
        }

    # --- from the workers ---

    async def on_token_batch(self, msg: TokenBatch, inbound) -> None:
        """One step's tokens for some of our requests (only those placed on the sender)."""
        for delta in msg.deltas:
            stream = self.streams.get(delta.request_id)
            if stream is None:
                continue
            if self.decode_of.get(delta.request_id) != inbound.peer:
                self.log.warning(
                    "tokens_refused",
                    request_id=delta.request_id,
                    sender=inbound.peer,
                    reason="not placed on the sender",
                )
                continue
            stream.put_nowait(delta)

    def request_refused(self, error, inbound) -> None:
        """A decode worker refused a Generate (draining, or it no longer knows us): the
        request never started there, so it moves on as from a dead worker."""
        stream = self.streams.get(error.request_id)
        if stream is not None and self.decode_of.get(error.request_id) == inbound.peer:
            stream.put_nowait(
                Delta(
                    request_id=error.request_id,
                    new_token_ids=[],
                    new_text="",
                    error=(
                        f"{WORKER_DIED} {inbound.peer} refused it ({error.code}: {error.message})"
                    ),
                )
            )

    async def on_peer_dead(self, peer_id: str) -> None:
        """A decode worker died: its requests move elsewhere (or end with an error).
        The router died: reconnect to its successor."""
        if peer_id == self.router_id and self._accepting:
            self._services.append(asyncio.create_task(self._reconnect_router()))
        for request_id, decode in list(self.decode_of.items()):
            if decode == peer_id and request_id in self.streams:
                self.streams[request_id].put_nowait(
                    Delta(
                        request_id=request_id,
                        new_token_ids=[],
                        new_text="",
                        error=f"{WORKER_DIED} {peer_id}",
                    )
                )
        await super().on_peer_dead(peer_id)


def sum_tiers(workers: list[dict]) -> dict[str, dict[str, float]]:
    """Per tier, the tier counters of workers (onboarded, failed) and cache actors
    (offloaded, lookups, hits, evicted, blocks) added up: {"host": {"offloaded": n, ...}}."""
    tiers: dict[str, dict[str, float]] = {}
    for worker in workers:
        for key, value in worker.items():
            name, _, tier = key.rpartition("_")
            if tier in ("host", "disk") and name:
                counters = tiers.setdefault(tier, {})
                counters[name] = counters.get(name, 0.0) + value
    return tiers


def _as_error(message: str) -> Exception:
    """A worker's error for one request: bad input (ValueError) or the cluster's fault."""
    if message.startswith("unavailable:") or message == "aborted":
        return BackendUnavailable(message, retry_after=1.0)
    return ValueError(message)
