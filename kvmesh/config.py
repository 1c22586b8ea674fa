"""cluster.toml: the schema, the loader and KEY=VALUE overrides.

One file configures a whole cluster, and every CLI flag overrides one key. The classes
below are the single source of truth: their field defaults are the default cluster and
the `doc(...)` beside each field is that key's comment. The repository's cluster.toml is
`python -m kvmesh.config` (a test keeps the two equal), so an installed package needs no
data file and the reference can never drift from the schema.

Loading: TOML -> dict -> msgspec.convert (types, ranges, allowed values, unknown keys)
-> overrides, one at a time -> check() (rules across keys: one router, ports, nodes).
Every mistake is a ConfigError naming the dotted key, spelled as an override spells it
(`nodes.0.actors.1.count`), what was given and what is allowed.

The address book: actors expand in file order (nodes, each node's [[nodes.actors]], then
count); the k-th actor of a role is "<role>-k" and the i-th actor overall gets the two
ports base_port + 2i (its ROUTER socket) and base_port + 2i + 1 (its PUB socket of KV
events and load), so every process derives the same book from the same config:

    [[nodes]] a:  frontend x1   router x1   decode x2            [[nodes]] b:  decode x1
    i             0             1           2         3                        4
    actor_id      frontend-0    router-0    decode-0  decode-1                 decode-2

    endpoint         tcp://<its node's address>:<base_port + 2i>      ipc://<ipc_dir>/<id>
    events_endpoint  tcp://<its node's address>:<base_port + 2i + 1>  ipc://<ipc_dir>/<id>.events
    bind, events_bind: the same, with cluster.host for the address    the same ipc:// paths
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import json
import re
import textwrap
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import Meta, Struct

Role = Literal["frontend", "router", "prefill", "decode", "cache"]
ENGINE_ROLES = ("prefill", "decode")  # the roles that run a model on a device
REQUIRED_ROLES = ("frontend", "router", "decode")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
PORTS_PER_ACTOR = 2  # endpoint (ROUTER) and events_endpoint (PUB)
UNIX_PATH_MAX = 107  # bytes of a Unix socket path (sun_path less its NUL)
HEADER = """\
# kvmesh cluster configuration: every key, with what it means.
# `python -m kvmesh.config` prints the default cluster: one machine, CPU, the bundled tiny
# model, listening on 127.0.0.1 only. Override any key as KEY=VALUE, for example
# router.policy=round_robin or nodes.0.actors.3.count=4.
"""


def doc(text: str, **constraints) -> Meta:
    """A key's comment in cluster.toml, with its msgspec constraints (ge, le, ...)."""
    return Meta(description=text, **constraints)


class ConfigError(ValueError):
    """A mistake in the configuration; the message names the dotted key, what was given
    and what is allowed (or the file and line of a TOML syntax error)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class Table(Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every table: immutable, and an unknown key is an error, never ignored."""


class ClusterSettings(Table):
    """The [cluster] table."""

    name: Annotated[str, doc("Cluster name, shown in logs and `kvmesh status`.",
                             min_length=1)] = "kvmesh"
    host: Annotated[str, doc(
        "Address every actor and the frontend's HTTP server bind. 127.0.0.1 accepts "
        "connections from this host only; binding wider (\"0.0.0.0\") is an explicit "
        "choice, needed when nodes are on several hosts.", min_length=1)] = "127.0.0.1"
    base_port: Annotated[int, doc(
        "Actor i of the address book listens on base_port + 2i and base_port + 2i + 1 "
        "(tcp:// only).",
        ge=1, le=65535)] = 5600
    ipc_dir: Annotated[str, doc(
        "Directory for ipc:// endpoints instead of tcp:// (nodes on one host only; one "
        "directory per cluster); \"\" = tcp://.")] = ""
    heartbeat_interval: Annotated[float, doc(
        "Seconds between heartbeats, both ways, on every actor connection.", gt=0)] = 1.0
    liveness: Annotated[int, doc(
        "Heartbeat intervals of silence after which a peer is declared dead.", ge=1)] = 3
    grace_period: Annotated[float, doc(
        "Seconds an actor drains requests in progress after SIGTERM.", ge=0)] = 10.0


class ModelConfig(Table):
    """The [model] table."""

    path: Annotated[str, doc(
        "Model directory (Hugging Face layout); \"\" = the bundled tiny model, made on "
        "first use in $XDG_CACHE_HOME/kvmesh/tiny-llama.")] = ""
    name: Annotated[str, doc(
        "Model name in the API; \"\" = the model directory's name.")] = ""
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], doc(
        "Weights and KV cache dtype.")] = "float32"
    block_size: Annotated[int, doc(
        "Tokens per KV block, the unit of prefix caching, routing and transfer.",
        ge=1)] = 16
    max_model_len: Annotated[int, doc(
        "Cap on prompt + output tokens; 0 = the model's own context length.", ge=0)] = 0

    @property
    def resolved_path(self) -> Path:
        """The model directory; the bundled tiny model's (see ensure_tiny) when path is ""."""
        if self.path:
            return Path(self.path)
        from kvmesh.gpu.tiny import default_tiny_path  # numpy only, not torch

        return default_tiny_path()

    @property
    def served_name(self) -> str:
        return self.name or self.resolved_path.name


class KVConfig(Table):
    """The [kv] table."""

    device_blocks: Annotated[int, doc(
        "KV blocks in each worker's device pool; 0 = size the pool from free memory "
        "(what a GPU node wants). 4096 blocks of the tiny model are 128 MiB per worker.",
        ge=0)] = 4096
    transfer: Annotated[Literal["auto", "shm", "zmq", "ucx"], doc(
        "KV data plane between workers. auto: shm on one host, else ucx when installed, "
        "else zmq; naming one forces it.")] = "auto"
    host_gb: Annotated[float, doc(
        "Host DRAM tier of each node's cache actor, GiB, shared by the node's workers: "
        "blocks a worker evicts go there and come back on a prefix hit. Reserved in "
        "/dev/shm at start. Needs > 0 where a cache actor runs.", ge=0)] = 0.5
    disk_gb: Annotated[float, doc(
        "SSD tier behind each cache actor's host tier (blocks evicted from DRAM, one "
        "checksummed file each, kept across restarts), GiB; 0 = no disk tier.", ge=0)] = 0.0
    disk_path: Annotated[str, doc(
        "Directory of the disk tiers (each cache actor uses <disk_path>/<its id>); "
        "required when disk_gb > 0.")] = ""
    host_eviction: Annotated[Literal["lru", "lfu", "fifo"], doc(
        "Which block a full host tier evicts (demotes to disk) first: least recently "
        "used, least frequently used, or first in.")] = "lru"
    disk_eviction: Annotated[Literal["lru", "lfu", "fifo"], doc(
        "Which block a full disk tier deletes first.")] = "lru"


class RouterConfig(Table):
    """The [router] table."""

    policy: Annotated[Literal["kv", "round_robin", "random", "least_loaded"], doc(
        "kv: a worker's cost is the prompt tokens it lacks (its cached prefix weighted per "
        "tier) + load_weight x its load, in tokens; round_robin, random and least_loaded "
        "ignore the cache.")] = "kv"
    device_weight: Annotated[float, doc(
        "kv: credit for prompt blocks cached on the worker's device.", ge=0)] = 1.0
    host_weight: Annotated[float, doc(
        "kv: credit for prompt blocks in the host DRAM tier.", ge=0)] = 0.75
    disk_weight: Annotated[float, doc(
        "kv: credit for prompt blocks in the disk tier.", ge=0)] = 0.25
    load_weight: Annotated[float, doc(
        "kv: weight of the worker's load (queued, cached and predicted tokens).",
        ge=0)] = 1.0
    temperature: Annotated[float, doc(
        "kv: 0 takes the lowest cost; T > 0 samples workers ~ exp(-cost / T), T in tokens.",
        ge=0)] = 0.0
    seed: Annotated[int, doc("Seed of random and of sampling at temperature > 0.",
                             ge=0)] = 0
    disagg_min_tokens: Annotated[int, doc(
        "A prompt whose uncached suffix is shorter than this is prefilled on its decode "
        "worker, not sent to a prefill worker; 0 = always disaggregate.", ge=0)] = 128
    prefill_busy_tokens: Annotated[int, doc(
        "A prefill worker with more queued and predicted tokens than this is busy; when "
        "all are, the decode worker prefills.", ge=0)] = 32768


class FrontendConfig(Table):
    """The [frontend] table."""

    http_port: Annotated[int, doc("HTTP port, bound on cluster.host.", ge=1, le=65535)] = 8000
    max_num_requests: Annotated[int, doc(
        "Requests in flight per frontend; more are refused as overloaded until one "
        "finishes.", ge=1)] = 1024
    request_timeout: Annotated[float, doc(
        "Seconds before a request is aborted and answered with an error.", gt=0)] = 600.0
    keep_alive: Annotated[float, doc(
        "Seconds an idle client connection stays open for its next request. Longer than "
        "a busy client may take to read a response's end and send again: a connection "
        "closed under that next request fails it before it reaches the server.",
        gt=0)] = 30.0
    max_migrations: Annotated[int, doc(
        "Times one request may move to another decode worker when its worker dies "
        "(prompt + tokens so far are replayed there); 0 = fail instead.", ge=0)] = 3


class SecurityConfig(Table):
    """The [security] table."""

    key_dir: Annotated[str, doc(
        "Directory of CurveZMQ keys (`kvmesh keys generate DIR`); \"\" = plain "
        "ZeroMQ.")] = ""

    @property
    def key_path(self) -> Path | None:
        return Path(self.key_dir) if self.key_dir else None


class LoggingConfig(Table):
    """The [logging] table."""

    level: Annotated[Literal["debug", "info", "warning", "error"], doc(
        "Minimum level written.")] = "info"
    json: Annotated[bool, doc("JSON lines instead of key=value.")] = False


class ActorGroup(Table):
    """One [[nodes.actors]] entry: `count` actors of one role on the node."""

    role: Annotated[Role, doc(
        "frontend (HTTP), router (one per cluster), prefill, decode, or cache (at most "
        "one per node).")]
    count: Annotated[int, doc("How many; 0 disables the entry.", ge=0)] = 1
    device: Annotated[str, doc(
        "prefill and decode: \"cpu\", \"cuda:N\", or \"cuda\" = the node's next GPU that no "
        "entry names; other roles: \"cpu\".")] = "cpu"
    max_num_seqs: Annotated[int, doc(
        "prefill and decode: sequences batched at once.", ge=1)] = 256
    max_num_batched_tokens: Annotated[int, doc(
        "prefill and decode: tokens computed per step.", ge=1)] = 2048


class NodeConfig(Table):
    """One [[nodes]] entry: a host and the actors it runs."""

    name: Annotated[str, doc("Node name; `kvmesh up --node NAME` starts its actors.")]
    address: Annotated[str, doc("Address other nodes reach this node's actors at.")]
    actors: Annotated[tuple[ActorGroup, ...], doc(
        "The actors of this node, in address book order.")] = ()


DEFAULT_NODE = NodeConfig("local", "127.0.0.1", (
    ActorGroup("frontend"), ActorGroup("router"), ActorGroup("prefill"),
    ActorGroup("decode", count=2), ActorGroup("cache"),
))


class ActorSpec(Struct, frozen=True):
    """One actor of the expanded address book."""

    actor_id: str  # "<role>-<k>": the k-th actor of its role in the cluster
    role: str
    node: str
    device: str  # "cpu" or "cuda:N"; "cuda" resolved
    max_num_seqs: int
    max_num_batched_tokens: int
    endpoint: str  # where peers connect to its ROUTER socket
    events_endpoint: str  # where the router subscribes to its PUB socket
    bind: str  # what the actor binds for endpoint
    events_bind: str  # and for events_endpoint


class ClusterConfig(Table):
    """The whole of cluster.toml. Build it with load_config, which checks it."""

    cluster: Annotated[ClusterSettings, doc(
        "Where actors listen and how they watch each other.")] = ClusterSettings()
    model: Annotated[ModelConfig, doc(
        "What every prefill and decode worker serves.")] = ModelConfig()
    kv: Annotated[KVConfig, doc(
        "KV block pools, the data plane between workers, and the cache actor's "
        "tiers.")] = KVConfig()
    router: Annotated[RouterConfig, doc(
        "How the router places each request on workers.")] = RouterConfig()
    frontend: Annotated[FrontendConfig, doc(
        "The OpenAI-compatible HTTP server.")] = FrontendConfig()
    security: Annotated[SecurityConfig, doc(
        "CurveZMQ on every actor socket.")] = SecurityConfig()
    logging: Annotated[LoggingConfig, doc(
        "The log lines every actor writes to stderr.")] = LoggingConfig()
    nodes: Annotated[tuple[NodeConfig, ...], doc(
        "The machines and the actors each runs. Slurm: the first node hosts the router "
        "and the frontend.")] = (DEFAULT_NODE,)

    @property
    def actors(self) -> list[ActorSpec]:
        """The address book: every actor of the cluster, in a fixed order."""
        return [spec for _, spec in expand(self)]

    def actors_on(self, node: str) -> list[ActorSpec]:
        """The actors that `kvmesh up --node NAME` starts."""
        names = [n.name for n in self.nodes]
        if node not in names:
            close = difflib.get_close_matches(node, names, n=1)
            hint = f" (did you mean {shown(close[0])}?)" if close else ""
            raise ConfigError(f"node {shown(node)}: no such node{hint}; nodes: "
                              f"{', '.join(names)}", "nodes")
        return [spec for spec in self.actors if spec.node == node]

    @property
    def address_book(self) -> dict[str, str]:
        return {spec.actor_id: spec.endpoint for spec in self.actors}

    @property
    def router_endpoint(self) -> str:
        return next(spec.endpoint for spec in self.actors if spec.role == "router")

    @property
    def frontend_url(self) -> str:
        """Where clients reach the (first) frontend's HTTP API."""
        node = next(spec.node for spec in self.actors if spec.role == "frontend")
        address = next(n.address for n in self.nodes if n.name == node)
        return f"http://{host_port(address, self.frontend.http_port)}"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ClusterConfig:
    """Read cluster.toml at `path` (None: the default cluster), apply KEY=VALUE overrides
    in order, check the whole; every mistake raises ConfigError."""
    where = f"{path}: " if path is not None else ""
    cfg = convert(read_toml(Path(path)) if path is not None else {}, where)
    for text in overrides:
        cfg = apply_override(cfg, text)
    check(cfg, where)
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """"nodes.0.actors.1.count=3" -> (["nodes", "0", "actors", "1", "count"], 3). The
    value is a TOML scalar (integer, float, boolean, quoted string); any other text,
    such as round_robin or /data/model, is taken as a string."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. "
                          "router.policy=round_robin")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return path, value
    scalar = isinstance(parsed, (bool, int, float, str))
    return path, parsed if scalar else value  # dates, arrays and tables stay text


def apply_override(cfg: ClusterConfig, text: str) -> ClusterConfig:
    path, value = parse_override(text)
    node = thaw(msgspec.to_builtins(cfg))  # every key present, so absent means unknown
    tree = node
    for i, part in enumerate(path):
        here, key = dotted(path[:i]), dotted(path[: i + 1])
        if isinstance(node, dict):
            if part not in node:
                raise unknown_key("override ", path[:i], part, list(node))
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                count = f"{len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                raise ConfigError(f"override {key}: no such entry; {here} has {count} "
                                  "(indices from 0)", key)
            part = int(part)
        else:
            raise ConfigError(f"override {dotted(path)}: {here} is a value, not a table", key)
        if i == len(path) - 1:
            node[part] = value
        node = node[part]
    return convert(tree, "override ")


def config_to_toml(cfg: ClusterConfig, comments: bool = True) -> str:
    """cfg as cluster.toml text that load_config reads back equal; with every key's
    comment (on the first entry of each array of tables) when `comments`."""
    lines = [HEADER.rstrip()] if comments else []
    render(lines, cfg, [], comments)
    return "\n".join(lines).lstrip("\n") + "\n"


# -- reading and converting ----------------------------------------------------------


def read_toml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, _, at = str(exc).rpartition(" (at ")
        place = re.fullmatch(r"line (\d+), column (\d+)\)", at)
        if place:
            raise ConfigError(f"{path}:{place[1]}:{place[2]}: invalid TOML: {message}") from None
        last = text.count("\n") + 1  # "(at end of document)"
        raise ConfigError(f"{path}:{last}: invalid TOML: {exc}") from None


def convert(raw: dict, where: str) -> ClusterConfig:
    """raw as a ClusterConfig; msgspec finds the first mistake, this names it."""
    try:
        return msgspec.convert(raw, ClusterConfig)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).partition(" - at `")
        path = [int(i) if i else name for name, i in re.findall(r"\.(\w+)|\[(\d+)\]", at)]
        unknown = re.fullmatch(r"Object contains unknown field `(.*)`", message)
        if unknown:
            names = [f.name for f in type_at(path).fields]
            raise unknown_key(where, path, unknown[1], names) from None
        missing = re.fullmatch(r"Object missing required field `(.*)`", message)
        if missing:
            path.append(missing[1])
            raise ConfigError(f"{where}{dotted(path)}: missing; expected "
                              f"{describe(type_at(path))}", dotted(path)) from None
        given = raw
        for part in path:
            given = given[part]
        raise ConfigError(f"{where}{dotted(path)}: expected {describe(type_at(path))}, "
                          f"got {shown(given)}", dotted(path)) from None


def unknown_key(where: str, parent: list, name: str, names: list[str]) -> ConfigError:
    key = dotted([*parent, name])
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {dotted([*parent, close[0]])}?)" if close else ""
    return ConfigError(f"{where}{key}: unknown key{hint}; allowed: {', '.join(names)}", key)


def type_at(path: list) -> mi.Type:
    info = mi.type_info(ClusterConfig)
    for part in path:
        info = bare(info)
        info = info.item_type if isinstance(part, int) else next(
            f.type for f in info.fields if f.name == part)
    return bare(info)


def bare(info: mi.Type) -> mi.Type:
    return info.type if isinstance(info, mi.Metadata) else info


def describe(info: mi.Type) -> str:
    """What a key allows, in words."""
    if isinstance(info, mi.LiteralType):
        return "one of " + ", ".join(shown(value) for value in info.values)
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.StrType):
        return "a non-empty string" if info.min_length else "a string"
    if isinstance(info, (mi.IntType, mi.FloatType)):
        noun = "an integer" if isinstance(info, mi.IntType) else "a number"
        if info.ge is not None and info.le is not None:
            return f"{noun} from {info.ge} to {info.le}"
        if info.ge is not None:
            return f"{noun} >= {info.ge}"
        return f"{noun} > {info.gt}" if info.gt is not None else noun
    if isinstance(info, mi.StructType):
        return "a table"
    assert isinstance(info, mi.VarTupleType), f"no description for {info}"
    return "an array of tables"


def shown(value: object) -> str:
    """value as TOML writes it, or what it is when that would not help."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    return repr(value) if isinstance(value, (int, float)) else str(value)


def dotted(path: Sequence) -> str:
    return ".".join(str(part) for part in path)


def thaw(value: object) -> object:
    """to_builtins output with lists for tuples, so an override can set an entry."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(item) for item in value]
    return value


# -- the address book and the rules across keys --------------------------------------


def expand(cfg: ClusterConfig) -> list[tuple[str, ActorSpec]]:
    """(key of the [[nodes.actors]] entry, spec) for every actor, in address book order."""
    book: list[tuple[str, ActorSpec]] = []
    counts: Counter[str] = Counter()
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
                    bind = [f"tcp://{host_port(cfg.cluster.host, port + k)}" for k in (0, 1)]
                book.append((f"nodes.{n}.actors.{a}", ActorSpec(
                    actor_id, group.role, node.name, device, group.max_num_seqs,
                    group.max_num_batched_tokens, *connect, *bind)))
    return book


def check(cfg: ClusterConfig, where: str = "") -> None:
    """The rules no single key can break: nodes, roles, devices, addresses, ports."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{where}{key}: {problem}", key)

    if not cfg.nodes:
        fail("nodes", "expected at least one [[nodes]] table, got none")
    first: dict[str, int] = {}
    for n, node in enumerate(cfg.nodes):
        if not NAME.fullmatch(node.name):
            fail(f"nodes.{n}.name", "expected a name of letters, digits, '.', '_' and '-', "
                 f"got {shown(node.name)}")
        if node.name in first:
            fail(f"nodes.{n}.name", f"duplicate node name {shown(node.name)} (also "
                 f"nodes.{first[node.name]}.name); expected a name unique in the cluster")
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
                fail(key, f'a {group.role} runs no model; expected "cpu", '
                     f"got {shown(group.device)}")
        caches = sum(group.count for group in node.actors if group.role == "cache")
        if caches > 1:
            fail(f"nodes.{n}.actors", f"{caches} cache actors on node {shown(node.name)}; "
                 "expected at most one per node")
    book = expand(cfg)
    roles = Counter(spec.role for _, spec in book)
    for role in REQUIRED_ROLES:
        if not roles[role]:
            fail("nodes", f"no {role} actor; expected at least one [[nodes.actors]] with "
                 f'role = "{role}" and count >= 1')
    if roles["router"] > 1:
        second = next(key for key, spec in book if spec.actor_id == "router-1")
        fail(second, f"{roles['router']} routers; expected exactly one in the cluster")
    if roles["cache"] and cfg.kv.host_gb <= 0:
        cache = next(key for key, spec in book if spec.role == "cache")
        fail("kv.host_gb", f"expected > 0 where a cache actor runs ({cache}: its host tier "
             f"is where workers offload to, and disk blocks are read back through it), "
             f"got {cfg.kv.host_gb}")
    if cfg.kv.disk_gb > 0 and not cfg.kv.disk_path:
        fail("kv.disk_path", f"expected a directory when kv.disk_gb > 0 (it is "
             f'{cfg.kv.disk_gb}), got ""')
    check_network(cfg, book, fail)


def check_network(cfg: ClusterConfig, book: list[tuple[str, ActorSpec]], fail) -> None:
    settings = cfg.cluster
    address = {node.name: node.address for node in cfg.nodes}
    if is_loopback(settings.host):
        for n, node in enumerate(cfg.nodes):
            if not is_loopback(node.address):
                fail("cluster.host", f"{shown(settings.host)} accepts connections from this "
                     f"host only, but nodes.{n}.address is {shown(node.address)}; expected "
                     'an address other hosts reach, such as "0.0.0.0"')
    taken: dict[tuple[str, int], str] = {}
    if settings.ipc_dir:
        if len(set(address.values())) > 1:
            fail("cluster.ipc_dir", f"ipc:// reaches one host only, but the nodes have "
                 f"addresses {', '.join(sorted(set(address.values())))}; expected \"\" "
                 "(tcp://) or every node on one address")
        longest = max(len(spec.events_bind.encode()) - len("ipc://") for _, spec in book)
        if longest > UNIX_PATH_MAX:
            fail("cluster.ipc_dir", f"{shown(settings.ipc_dir)} makes socket paths of "
                 f"{longest} bytes; expected a directory whose paths fit in {UNIX_PATH_MAX}")
    else:
        num_ports = PORTS_PER_ACTOR * len(book)
        last = settings.base_port + num_ports - 1
        if last > 65535:
            fail("cluster.base_port", f"{settings.base_port} gives the {len(book)} actors "
                 f"ports up to {last}; expected an integer from 1 to {65536 - num_ports}")
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
            fail(key, f"{spec.actor_id} would serve HTTP on {host_port(*place)} like "
                 f"{serving[place]}; expected one frontend per node address")
        if place in taken:
            fail("frontend.http_port", f"{http_port} on {place[0]} is also the port of "
                 f"{taken[place]} (actors have ports from cluster.base_port = "
                 f"{settings.base_port}); expected another port")
        serving[place] = spec.actor_id


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- cluster.toml text ---------------------------------------------------------------


def render(lines: list[str], table: Struct, path: list[str], comments: bool) -> None:
    """Scalars first, then sub-tables, then arrays of tables: the order TOML needs."""
    fields = mi.type_info(type(table)).fields
    nested = []
    for f in fields:
        value = getattr(table, f.name)
        if isinstance(value, (Struct, tuple)):
            nested.append((f, value))
            continue
        if comments:
            lines.extend(comment(f))
        lines.append(f"{f.name} = {shown(value)}")
    for f, value in nested:
        key = dotted([*path, f.name])
        for i, item in enumerate(value if isinstance(value, tuple) else [value]):
            lines.append("")
            if comments and i == 0:
                lines.extend(comment(f))
            lines.append(f"[[{key}]]" if isinstance(value, tuple) else f"[{key}]")
            render(lines, item, [*path, f.name], comments and i == 0)


def comment(f: mi.Field) -> list[str]:
    text = f.type.extra_json_schema["description"]
    return textwrap.wrap(text, 90, initial_indent="# ", subsequent_indent="# ")


if __name__ == "__main__":
    print(config_to_toml(load_config()), end="")
