"""One entry point per role: build the actor that cluster.toml names `actor_id`.

`kvmesh actor ID` (what `kvmesh up` and Slurm scripts run) calls run_actor; each
init_<role> maps config keys onto that actor's settings and imports only what the
role needs, so a router or frontend never imports torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kvmesh.actors.base import Actor, ActorConfig
from kvmesh.config import ActorSpec, ClusterConfig, ConfigError
from kvmesh.config.book import bind_host, exposure

if TYPE_CHECKING:
    from kvmesh.frontend.limits import HTTPLimits

WORKER_ROLES = ("prefill", "decode")


def find_spec(cfg: ClusterConfig, actor_id: str) -> ActorSpec:
    for spec in cfg.actors:
        if spec.actor_id == actor_id:
            return spec
    known = ", ".join(spec.actor_id for spec in cfg.actors)
    raise ConfigError(
        f"actor id {actor_id!r} is not in the cluster; its actors are {known}", key="nodes"
    )


def node_address(cfg: ClusterConfig, node: str) -> str:
    return next(n.address for n in cfg.nodes if n.name == node)


def actor_config(cfg: ClusterConfig, spec: ActorSpec, max_frame_size: int = 0) -> ActorConfig:
    return ActorConfig(
        actor_id=spec.actor_id,
        node=spec.node,
        advertise=node_address(cfg, spec.node),
        heartbeat_interval=cfg.cluster.heartbeat_interval,
        liveness=cfg.cluster.liveness,
        grace_period=cfg.cluster.grace_period,
        key_dir=cfg.security.key_path,
        max_frame_size=max_frame_size,
    )


def worker_frame_size(served) -> int:
    """The largest frame a worker of model `served` (a [model] table) takes: a KV
    data-plane chunk holds whole layers, so one layer of the longest prompt's blocks, or
    4 x the message limit if that is more."""
    from kvmesh.gpu.model_config import DTYPE_BYTES, ModelConfig, capped_context
    from kvmesh.protocol import MAX_MESSAGE_SIZE

    model = ModelConfig.from_pretrained(served.resolved_path)
    block_size = served.block_size
    layer_block = (
        model.kv_bytes_per_block(block_size, DTYPE_BYTES[served.dtype]) // model.num_layers
    )
    max_blocks = -(-capped_context(model.max_model_len, served.max_model_len) // block_size)
    return max(4 * MAX_MESSAGE_SIZE, max_blocks * layer_block + (1 << 20))


def init_router(cfg: ClusterConfig, spec: ActorSpec) -> Actor:
    from kvmesh.actors.router import RouterActor, RouterActorSettings
    from kvmesh.router.policy import RouterSettings

    fields = {name: getattr(cfg.router, name) for name in RouterSettings.__struct_fields__}
    first, *others = cfg.served_models
    pools: dict[str, list[tuple[int, str]]] = {}
    for pool in cfg.pools:
        pools.setdefault(pool.model or first.served_name, []).append(
            (pool.min_prompt_tokens, pool.name)
        )
    settings = RouterActorSettings(
        endpoint=spec.bind,
        model_name=first.served_name,
        block_size=first.block_size,
        policy=RouterSettings(**fields),
        other_models={m.served_name: m.block_size for m in others},
        pools={model: tuple(sorted(own, reverse=True)) for model, own in pools.items()},
    )
    return RouterActor(actor_config(cfg, spec), settings)


def init_frontend(cfg: ClusterConfig, spec: ActorSpec) -> Actor:
    from kvmesh.actors.frontend import FrontendActor, FrontendSettings
    from kvmesh.frontend.admission import AdmissionPolicy
    from kvmesh.frontend.models import ServedModel

    workers = [a for a in cfg.actors if a.role in WORKER_ROLES]
    models = tuple(
        ServedModel(
            name=m.served_name,
            path=str(m.resolved_path),
            block_size=m.block_size,
            dtype=m.dtype,
            max_model_len=m.max_model_len,
            expected_workers=sum(1 for a in workers if a.model == m.served_name),
            adapters=tuple(m.adapters.items()),
            admission=AdmissionPolicy(
                max_inflight=m.max_inflight,
                max_queue=m.max_queue,
                queue_timeout=m.queue_timeout,
                default_priority=m.default_priority,
            ),
        )
        for m in cfg.served_models
    )
    settings = FrontendSettings(
        models=models,
        router_endpoint=cfg.router_endpoint,
        router_id=cfg.router_id,
        hash_key=cluster_hash_key(cfg),
        host=bind_host(cfg.cluster.host, node_address(cfg, spec.node)),
        http_port=cfg.frontend.http_port,
        max_num_requests=cfg.frontend.max_num_requests,
        max_migrations=cfg.frontend.max_migrations,
        request_timeout=cfg.frontend.request_timeout,
        keep_alive=cfg.frontend.keep_alive,
        max_connections=cfg.frontend.max_connections,
        limits=http_limits(cfg.frontend),
    )
    return FrontendActor(actor_config(cfg, spec), settings)


def cluster_hash_key(cfg: ClusterConfig) -> bytes:
    """The secret keying block hashes: security.key_dir's, or this user's."""
    from kvmesh.transport.keys import hash_key

    try:
        return hash_key(cfg.security.key_path)
    except ValueError as exc:
        raise ConfigError(str(exc), key="security.key_dir") from None


def http_limits(frontend) -> HTTPLimits:
    """The [frontend] table's HTTP limits; the API key file is read here, at start."""
    from kvmesh.frontend.limits import HTTPLimits, parse_hosts, read_api_keys

    try:
        keys = read_api_keys(frontend.api_key_file) if frontend.api_key_file else frozenset()
    except ValueError as exc:
        raise ConfigError(str(exc), key="frontend.api_key_file") from None
    return HTTPLimits(
        max_body_bytes=frontend.max_body_bytes,
        body_timeout=frontend.body_timeout,
        max_choices=frontend.max_choices,
        default_max_tokens=frontend.default_max_tokens,
        api_keys=keys,
        metrics_auth=frontend.metrics_auth,
        allowed_hosts=parse_hosts(frontend.allowed_hosts),
        salt_by_api_key=frontend.salt_by_api_key,
    )


def init_worker(cfg: ClusterConfig, spec: ActorSpec) -> Actor:
    from kvmesh.actors.worker import DecodeWorker, PrefillWorker, WorkerSettings
    from kvmesh.config.topology import engine_threads
    from kvmesh.gpu.kv_cache import configured_num_blocks

    served = cfg.model_of(spec)
    cache = node_cache(cfg, spec.node, spec.model)
    cpu_engines = [
        a for a in cfg.actors_on(spec.node) if a.role in ("prefill", "decode") and a.device == "cpu"
    ]
    settings = WorkerSettings(
        model_path=str(served.resolved_path),
        model_name=served.served_name,
        endpoint=spec.bind,
        events_endpoint=spec.events_bind,
        router_endpoint=cfg.router_endpoint,
        router_id=cfg.router_id,
        hash_key=cluster_hash_key(cfg),
        device=spec.device,
        dtype=served.dtype,
        block_size=served.block_size,
        num_blocks=configured_num_blocks(cfg.kv.device_blocks, spec.device),
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        transfer=cfg.kv.transfer,
        cache_id=cache.actor_id if cache else None,
        cache_endpoint=cache.endpoint if cache else None,
        max_model_len=served.max_model_len,
        # the node's CPU engines split its cores, one core left for the other actors
        threads=engine_threads(len(cpu_engines)) if spec.device == "cpu" else None,
        engine=served.engine,
        pool=spec.pool,
        adapters=dict(served.adapters),
        max_loras=served.max_loras,
    )
    config = actor_config(cfg, spec, worker_frame_size(served))
    if served.engine == "vllm":
        from kvmesh.actors.vllm_worker import init_vllm_worker

        return init_vllm_worker(cfg, config, settings)
    if any(a.role == "planner" for a in cfg.actors):  # it may switch this worker's role
        from kvmesh.actors.switching import SwitchingWorker

        return SwitchingWorker(config, settings, spec.role)
    worker_class = PrefillWorker if spec.role == "prefill" else DecodeWorker
    return worker_class(config, settings)


def init_cache(cfg: ClusterConfig, spec: ActorSpec) -> Actor:
    from kvmesh.actors.cache import CacheActor, CacheSettings
    from kvmesh.gpu.model_config import DTYPE_BYTES, ModelConfig

    served = cfg.model_of(spec)
    model = ModelConfig.from_pretrained(served.resolved_path)
    settings = CacheSettings(
        endpoint=spec.bind,
        events_endpoint=spec.events_bind,
        router_endpoint=cfg.router_endpoint,
        router_id=cfg.router_id,
        record_bytes=model.kv_record_bytes(served.block_size, DTYPE_BYTES[served.dtype]),
        fingerprint=model.fingerprint(served.dtype, served.block_size),
        model=served.served_name,
        host_bytes=int(cfg.kv.host_gb * 2**30),
        disk_path=cfg.kv.disk_path,
        disk_bytes=int(cfg.kv.disk_gb * 2**30),
        host_eviction=cfg.kv.host_eviction,
        disk_eviction=cfg.kv.disk_eviction,
        object_url=cfg.kv.object_url,
        object_endpoint=cfg.kv.object_endpoint,
        object_write=cfg.kv.object_write,
        # benchmarks: a far object store's round trip (kvmesh.cache.object_tier)
        object_latency=float(os.environ.get("KVMESH_OBJECT_LATENCY_MS", "0")) / 1e3,
    )
    return CacheActor(actor_config(cfg, spec), settings)


def init_planner(cfg: ClusterConfig, spec: ActorSpec) -> Actor:
    from kvmesh.actors.planner import PlannerActor, PlannerActorSettings
    from kvmesh.planner.policy import PlannerSettings

    p = cfg.planner
    fields = {name: getattr(p, name) for name in PlannerSettings.__dataclass_fields__}
    settings = PlannerActorSettings(
        router_endpoint=cfg.router_endpoint,
        router_id=cfg.router_id,
        metrics_url=f"{cfg.frontend_url}/metrics",
        metrics_key=planner_metrics_key(cfg),
        interval=p.interval,
        policy=PlannerSettings(**fields),
        host=cfg.cluster.host,
        metrics_port=p.metrics_port,
    )
    return PlannerActor(actor_config(cfg, spec), settings)


def planner_metrics_key(cfg: ClusterConfig) -> str | None:
    """The API key the planner scrapes /metrics with: the first of the frontend's key
    file (in sort order) when /metrics needs one, else None."""
    frontend = cfg.frontend
    if not (frontend.metrics_auth and frontend.api_key_file):
        return None
    from kvmesh.frontend.limits import read_api_keys

    return min(read_api_keys(frontend.api_key_file))


def node_cache(cfg: ClusterConfig, node: str, model: str) -> ActorSpec | None:
    """The cache actor of `node` for `model` (at most one), or None."""
    return next(
        (a for a in cfg.actors if a.role == "cache" and a.node == node and a.model == model), None
    )


INIT = {
    "router": init_router,
    "cache": init_cache,
    "frontend": init_frontend,
    "prefill": init_worker,
    "decode": init_worker,
    "planner": init_planner,
}


def build_actor(cfg: ClusterConfig, actor_id: str) -> Actor:
    spec = find_spec(cfg, actor_id)
    init = INIT.get(spec.role)
    if init is None:
        raise ConfigError(f"role {spec.role!r} of {actor_id} has no actor yet", key="nodes")
    exposed = exposure(cfg)
    if exposed and not cfg.security.key_dir:  # allowed by security.insecure (check())
        import structlog

        structlog.get_logger(__name__).warning(
            "insecure",
            actor=actor_id,
            reason=f"{exposed} opens this actor's sockets to "
            "other hosts without keys (security.insecure = true): anyone reaching them "
            "can join the cluster as any actor",
        )
    if cfg.cluster.ipc_dir:  # its sockets are this user's alone, as the disk tier is
        from kvmesh.transport.private_dir import private_dir

        try:
            private_dir(cfg.cluster.ipc_dir, "cluster.ipc_dir")
        except ValueError as exc:
            raise ConfigError(str(exc), key="cluster.ipc_dir") from None
    return init(cfg, spec)
