"""The address book (every actor's id, node, device and endpoints, derived the same way
by every process from the same config) and the rules across keys that no single key's
type can state: nodes, roles, devices, addresses, ports (see kvmesh.config)."""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import re
from collections import Counter
from pathlib import Path

from kvmesh.config.schema import ActorSpec, ClusterConfig, ConfigError, host_port, shown

ENGINE_ROLES = ("prefill", "decode")  # the roles that run a model on a device
MODEL_ROLES = ("prefill", "decode", "cache")  # the roles that serve one model
REQUIRED_ROLES = ("frontend", "router", "decode")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
PORTS_PER_ACTOR = 2  # endpoint (ROUTER) and events_endpoint (PUB)
UNIX_PATH_MAX = 107  # bytes of a Unix socket path (sun_path less its NUL)
WILDCARDS = ("0.0.0.0", "::")  # cluster.host values that bind every interface


def bind_host(cluster_host: str, address: str) -> str:
    """What a node's actors (and its frontend's HTTP server) bind: every interface when
    cluster.host is a wildcard (they advertise `address`, their node's, to peers), else
    the node's own address, so two nodes on one host (127.0.0.1, 127.0.0.2) each listen
    where the address book says they are."""
    return cluster_host if cluster_host in WILDCARDS else address


def expand(cfg: ClusterConfig) -> list[tuple[str, ActorSpec]]:
    """(key of the [[nodes.actors]] entry, spec) for every actor, in address book order."""
    book: list[tuple[str, ActorSpec]] = []
    counts: Counter[str] = Counter()
    default_model = cfg.served_models[0].served_name
    for n, node in enumerate(cfg.nodes):
        named = {int(m[1]) for g in node.actors if (m := re.fullmatch(r"cuda:(\d+)", g.device))}
        free_gpus = (k for k in itertools.count() if k not in named)
        for a, group in enumerate(node.actors):
            for _ in range(group.count):
                actor_id = f"{group.role}-{counts[group.role]}"
                counts[group.role] += 1
                device = f"cuda:{next(free_gpus)}" if group.device == "cuda" else group.device
                if cfg.cluster.ipc_dir:
                    path = Path(cfg.cluster.ipc_dir) / actor_id
                    connect = bind = [f"ipc://{path}", f"ipc://{path}.events"]
                else:
                    port = cfg.cluster.base_port + PORTS_PER_ACTOR * len(book)
                    connect = [f"tcp://{host_port(node.address, port + k)}" for k in (0, 1)]
                    host = bind_host(cfg.cluster.host, node.address)
                    bind = [f"tcp://{host_port(host, port + k)}" for k in (0, 1)]
                book.append(
                    (
                        f"nodes.{n}.actors.{a}",
                        ActorSpec(
                            actor_id,
                            group.role,
                            node.name,
                            device,
                            group.max_num_seqs,
                            group.max_num_batched_tokens,
                            *connect,
                            *bind,
                            model=(group.model or default_model)
                            if group.role in MODEL_ROLES
                            else "",
                            pool=group.pool,
                        ),
                    )
                )
    return book


def check(cfg: ClusterConfig, where: str = "") -> None:
    """The rules no single key can break: nodes, roles, devices, addresses, ports."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{where}{key}: {problem}", key)

    if not cfg.nodes:
        fail("nodes", "expected at least one [[nodes]] table, got none")
    first: dict[str, int] = {}
    for n, node in enumerate(cfg.nodes):
        check_name(f"nodes.{n}.name", node.name, fail)
        if node.name in first:
            fail(
                f"nodes.{n}.name",
                f"duplicate node name {shown(node.name)} (also "
                f"nodes.{first[node.name]}.name); expected a name unique in the cluster",
            )
        first[node.name] = n
        if not node.address:
            fail(f"nodes.{n}.address", 'expected a host name or IP address, got ""')
        if not node.actors:
            fail(f"nodes.{n}.actors", "expected at least one [[nodes.actors]] table, got none")
        for a, group in enumerate(node.actors):
            key = f"nodes.{n}.actors.{a}.device"
            if not DEVICE.fullmatch(group.device):
                fail(key, f'expected "cpu", "cuda" or "cuda:N", got {shown(group.device)}')
            if group.role not in ENGINE_ROLES and group.device != "cpu":
                fail(
                    key, f'a {group.role} runs no model; expected "cpu", got {shown(group.device)}'
                )
    served = check_models(cfg, fail)
    for n, node in enumerate(cfg.nodes):
        caches: Counter[str] = Counter()
        for group in node.actors:
            if group.role == "cache":
                caches[group.model or served[0]] += group.count
        for model, count in caches.items():
            if count > 1:
                per = f" of model {shown(model)}" if len(served) > 1 else ""
                fail(
                    f"nodes.{n}.actors",
                    f"{count} cache actors{per} on node {shown(node.name)}; expected at most "
                    "one per node" + (" and model" if per else ""),
                )
    book = expand(cfg)
    roles = Counter(spec.role for _, spec in book)
    for role in REQUIRED_ROLES:
        if not roles[role]:
            fail(
                "nodes",
                f"no {role} actor; expected at least one [[nodes.actors]] with "
                f'role = "{role}" and count >= 1',
            )
    if roles["router"] > 1:
        second = next(key for key, spec in book if spec.actor_id == "router-1")
        fail(second, f"{roles['router']} routers; expected exactly one in the cluster")
    if roles["planner"] > 1:
        second = next(key for key, spec in book if spec.actor_id == "planner-1")
        fail(second, f"{roles['planner']} planners; expected at most one in the cluster")
    if roles["planner"] and len(cfg.served_models) > 1:
        key = next(key for key, spec in book if spec.role == "planner")
        fail(
            key,
            f"a planner balances one model's prefill and decode workers, and this cluster "
            f"serves {len(cfg.served_models)}; expected no planner with [[models]] (yet)",
        )
    planner = cfg.planner
    if planner.low >= planner.high:
        fail("planner.low", f"expected < planner.high ({planner.high}), got {planner.low}")
    for role in ("prefill", "decode"):
        low, high = getattr(planner, f"min_{role}"), getattr(planner, f"max_{role}")
        if low > high:
            fail(f"planner.min_{role}", f"expected <= planner.max_{role} ({high}), got {low}")
    if roles["cache"] and cfg.kv.host_gb <= 0:
        cache = next(key for key, spec in book if spec.role == "cache")
        fail(
            "kv.host_gb",
            f"expected > 0 where a cache actor runs ({cache}: its host tier "
            f"is where workers offload to, and disk blocks are read back through it), "
            f"got {cfg.kv.host_gb}",
        )
    if cfg.kv.disk_gb > 0 and not cfg.kv.disk_path:
        fail(
            "kv.disk_path",
            f'expected a directory when kv.disk_gb > 0 (it is {cfg.kv.disk_gb}), got ""',
        )
    check_pools(cfg, served, book, fail)
    for m, model in enumerate(cfg.served_models):
        name = model.served_name
        own = [(key, spec) for key, spec in book if spec.model == name]
        table = f"models.{m}" if cfg.models else "model"
        if not any(spec.role == "decode" for _, spec in own) and cfg.models:
            fail(
                "nodes",
                f"no decode actor serves model {shown(name)} ({table}); expected a "
                f'[[nodes.actors]] entry with role = "decode", count >= 1 and model = '
                f"{shown(name)}",
            )
        for adapter in model.adapters:
            if not NAME.fullmatch(adapter):
                fail(
                    f"{table}.adapters.{adapter}",
                    "expected an adapter name of letters, digits, '.', '_' and '-' (a request "
                    f'names it as "{name}:NAME")',
                )
        if model.engine == "vllm":
            check_engine_vllm(cfg, model, table, own, roles, fail)
    if cfg.kv.object_url:
        from kvmesh.cache.object_tier import parse_url

        try:
            parse_url(cfg.kv.object_url)
        except ValueError:
            fail("kv.object_url", f"expected s3://bucket[/prefix], got {cfg.kv.object_url!r}")
    check_network(cfg, book, fail)


def check_models(cfg: ClusterConfig, fail) -> list[str]:
    """[[models]]' served names (unique), and every actor group naming one of them;
    returns the served names, the default first."""
    if cfg.models and cfg.model != type(cfg.model)():
        fail("model", "set [model] or [[models]], not both; expected the keys in [[models]]")
    served: list[str] = []
    for m, model in enumerate(cfg.served_models):
        name = model.served_name
        if name in served:
            fail(
                f"models.{m}.name",
                f"duplicate served name {shown(name)} (also models.{served.index(name)}); "
                "expected a name unique in the cluster (set name = ...)",
            )
        served.append(name)
    for n, node in enumerate(cfg.nodes):
        for a, group in enumerate(node.actors):
            if not group.model:
                continue
            key = f"nodes.{n}.actors.{a}.model"
            if group.role not in MODEL_ROLES:
                fail(
                    key, f'a {group.role} serves every model; expected "", got {shown(group.model)}'
                )
            check_served(key, group.model, served, fail)
    return served


def check_served(key: str, model: str, served: list[str], fail) -> None:
    """`model`, given at `key`, must be one of the served names."""
    if model not in served:
        close = difflib.get_close_matches(model, served, n=1)
        hint = f" (did you mean {shown(close[0])}?)" if close else ""
        fail(
            key,
            f"no model is served as {shown(model)}{hint}; served: "
            + ", ".join(shown(name) for name in served),
        )


def check_name(key: str, name: str, fail) -> None:
    if not NAME.fullmatch(name):
        fail(key, f"expected a name of letters, digits, '.', '_' and '-', got {shown(name)}")


def check_pools(cfg: ClusterConfig, served: list[str], book, fail) -> None:
    """[[pools]]: unique names, a served model each; workers join pools of their own
    model; a model with pools has all its workers in them, one pool from 0 tokens, no two
    from the same length, and a decode worker in each."""
    pools: dict[str, int] = {}
    for p, pool in enumerate(cfg.pools):
        key = f"pools.{p}"
        check_name(f"{key}.name", pool.name, fail)
        if pool.name in pools:
            fail(
                f"{key}.name",
                f"duplicate pool name {shown(pool.name)} (also pools.{pools[pool.name]}.name)",
            )
        pools[pool.name] = p
        if pool.model:
            check_served(f"{key}.model", pool.model, served, fail)
    model_of = {pool.name: pool.model or served[0] for pool in cfg.pools}
    for n, node in enumerate(cfg.nodes):
        for a, group in enumerate(node.actors):
            if not group.pool:
                continue
            key = f"nodes.{n}.actors.{a}.pool"
            if group.role not in ENGINE_ROLES:
                fail(key, f'a {group.role} is in no pool; expected "", got {shown(group.pool)}')
            if group.pool not in pools:
                fail(
                    key,
                    f"no [[pools]] entry is named {shown(group.pool)}; pools: "
                    + (", ".join(shown(name) for name in pools) or "none"),
                )
            if model_of[group.pool] != (group.model or served[0]):
                fail(
                    key,
                    f"pool {shown(group.pool)} holds workers of model "
                    f"{shown(model_of[group.pool])}, these serve {shown(group.model or served[0])}",
                )
    for model in served:
        own = [pool for pool in cfg.pools if model_of[pool.name] == model]
        if not own:
            continue
        where = f"pools.{pools[own[0].name]}"
        unpooled = next(
            (k for k, s in book if s.model == model and s.role in ENGINE_ROLES and not s.pool),
            None,
        )
        if unpooled is not None:
            fail(
                f"{unpooled}.pool",
                f"model {shown(model)} has pools, so each of its prefill and decode "
                f"workers needs one; expected one of "
                + ", ".join(shown(pool.name) for pool in own),
            )
        starts = sorted(pool.min_prompt_tokens for pool in own)
        if starts[0] != 0:
            fail(
                f"{where}.min_prompt_tokens",
                f"no pool of model {shown(model)} takes prompts from 0 tokens; expected one "
                "pool with min_prompt_tokens = 0",
            )
        if len(set(starts)) != len(starts):
            twice = next(s for s in starts if starts.count(s) > 1)
            fail(
                f"{where}.min_prompt_tokens",
                f"two pools of model {shown(model)} start at {twice} tokens; expected "
                "different minimums",
            )
        for pool in own:
            if not any(s.pool == pool.name and s.role == "decode" for _, s in book):
                fail(
                    f"pools.{pools[pool.name]}",
                    f"pool {shown(pool.name)} has no decode actor; expected a "
                    f'[[nodes.actors]] entry with role = "decode", count >= 1 and pool = '
                    f"{shown(pool.name)}",
                )


def check_engine_vllm(cfg: ClusterConfig, model, where: str, own, roles: Counter, fail) -> None:
    """vLLM workers serve aggregated: no prefill workers, no host/disk tiers, no planner
    (yet). `own`: the (key, spec) of the actors serving this model."""
    from kvmesh.config.vllm_args import check_vllm

    for role, why, actors in (
        ("prefill", "disaggregation", own),
        ("cache", "host and disk KV tiers", own),
        ("planner", "role switches", expand(cfg)),
    ):
        key = next((key for key, spec in actors if spec.role == role), None)
        if key is not None:
            fail(key, f'{why}: with {where}.engine = "kvmesh" only; expected no {role} actor')
    if model.adapters:
        fail(f"{where}.adapters", 'LoRA adapters: with engine = "kvmesh" only; expected none')
    check_vllm(model, where, [spec.device for _, spec in own if spec.role in ENGINE_ROLES], fail)


def check_network(cfg: ClusterConfig, book: list[tuple[str, ActorSpec]], fail) -> None:
    settings = cfg.cluster
    address = {node.name: node.address for node in cfg.nodes}
    if is_loopback(settings.host):
        for n, node in enumerate(cfg.nodes):
            if not is_loopback(node.address):
                fail(
                    "cluster.host",
                    f"{shown(settings.host)} accepts connections from this "
                    f"host only, but nodes.{n}.address is {shown(node.address)}; expected "
                    'an address other hosts reach, such as "0.0.0.0"',
                )
    check_exposure(cfg, fail)
    taken: dict[tuple[str, int], str] = {}
    if settings.ipc_dir:
        if len(set(address.values())) > 1:
            fail(
                "cluster.ipc_dir",
                f"ipc:// reaches one host only, but the nodes have "
                f'addresses {", ".join(sorted(set(address.values())))}; expected "" '
                "(tcp://) or every node on one address",
            )
        longest = max(len(spec.events_bind.encode()) - len("ipc://") for _, spec in book)
        if longest > UNIX_PATH_MAX:
            fail(
                "cluster.ipc_dir",
                f"{shown(settings.ipc_dir)} makes socket paths of "
                f"{longest} bytes; expected a directory whose paths fit in {UNIX_PATH_MAX}",
            )
    else:
        num_ports = PORTS_PER_ACTOR * len(book)
        last = settings.base_port + num_ports - 1
        if last > 65535:
            fail(
                "cluster.base_port",
                f"{settings.base_port} gives the {len(book)} actors "
                f"ports up to {last}; expected an integer from 1 to {65536 - num_ports}",
            )
        for i in range(num_ports):
            spec = book[i // PORTS_PER_ACTOR][1]
            taken[address[spec.node], settings.base_port + i] = spec.actor_id
    http_port = cfg.frontend.http_port
    serving: dict[tuple[str, int], str] = {}  # frontends' HTTP (address, port)
    for key, spec in book:
        if spec.role != "frontend":
            continue
        place = (address[spec.node], http_port)
        if place in serving:
            fail(
                key,
                f"{spec.actor_id} would serve HTTP on {host_port(*place)} like "
                f"{serving[place]}; expected one frontend per node address",
            )
        if place in taken:
            fail(
                "frontend.http_port",
                f"{http_port} on {place[0]} is also the port of "
                f"{taken[place]} (actors have ports from cluster.base_port = "
                f"{settings.base_port}); expected another port",
            )
        serving[place] = spec.actor_id


def exposure(cfg: ClusterConfig) -> str | None:
    """`key = host` of the first setting that opens the actor sockets (tcp://) beyond
    this host, or None."""
    if cfg.cluster.ipc_dir:
        return None
    hosts = [("cluster.host", cfg.cluster.host)]
    hosts += [(f"nodes.{n}.address", node.address) for n, node in enumerate(cfg.nodes)]
    return next((f"{key} = {shown(host)}" for key, host in hosts if not is_loopback(host)), None)


def check_exposure(cfg: ClusterConfig, fail) -> None:
    """Actor sockets other hosts reach need keys: without them, anyone who reaches a
    socket is a full member of the cluster."""
    exposed = exposure(cfg)
    if exposed and not cfg.security.key_dir and not cfg.security.insecure:
        fail(
            "security.key_dir",
            f"{exposed} opens the actor sockets to other hosts, and "
            "without keys anyone reaching them could join as any actor; expected a key "
            "directory: make one with `kvmesh keys generate DIR --config cluster.toml` and "
            "set security.key_dir = DIR (or, on a network only you can reach, "
            "security.insecure = true)",
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
