"""Prometheus metrics of one frontend, served as text on GET /metrics.

The frontend measures what it sees (requests, tokens, time to first token, time
between tokens) as it happens. Everything else comes from backend.metrics() at scrape
time (a BackendMetrics), which in a cluster is the router's last status: each worker
reports its load (LoadReport) every `load_report_interval` (0.5 s) and at once when its
queues change, the cache actor its tiers (CacheReport) every second, and the frontend
polls the router every `status_interval` (0.5 s). So those series lag what happened by
up to about a second (1.5 s for the tiers); a request that has just ended may not be
counted yet.

    kvmesh_remote_prefill_total, kvmesh_kv_transfer_bytes_total     (counters)
    kvmesh_migrations_total, kvmesh_reusable_tokens_total           (counters)
    kvmesh_workers_alive, kvmesh_workers_expected                   (gauges)
    kvmesh_kv_{offload,onboard,lookup,hit}_blocks_total{tier}, kvmesh_kv_hit_rate{tier}
    kvmesh_router_<metric>                   one per field of ROUTER_METRICS (the router's
                                             RouterLoad): routing quality, worker deaths
    kvmesh_worker_<metric>{worker, role}     one per field of WORKER_METRICS: gauges of
                                             load, <metric>_total counters since start
    kvmesh_worker_kv_*_blocks_total{worker, role, tier}   WORKER_TIER_METRICS

A worker's load is a typed struct (protocol.WorkerLoad; AsyncEngine's EngineStats in
`kvmesh serve`); WORKER_METRICS and WORKER_TIER_METRICS are the one place that names
each of its fields (and each field of its per-tier protocol.OnboardCounters) as a
metric, with its type and meaning. A field missing from them is still served, as an
untyped kvmesh_worker_<field> that says so.

Each frontend has its own registry (no process-global state), so tests can run
several apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, UnknownMetricFamily

from kvmesh.protocol import OnboardCounters, RouterLoad, Tier, TierCounters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# backend.metrics() in a cluster is the router's last status (see the module doc)
LAG = " In a cluster, from load reports: up to ~1 s behind."
TIER_LAG = " From the workers' and cache actors' reports: up to ~1.5 s behind."
BACKEND_COUNTERS = {
    "remote_prefill_total": "Prompts prefilled on a prefill worker, not the decode worker." + LAG,
    "kv_transfer_bytes_total": "KV-cache bytes moved between workers on the data plane." + LAG,
    "migrations_total": "Requests moved to another decode worker because theirs died or "
    "refused them (the client's stream goes on).",
    "reusable_tokens_total": "Prompt tokens in leading blocks that an earlier request also "
    "had (among the last REUSE_WINDOW blocks seen): what an unbounded prefix cache would "
    "serve, whatever the cluster held.",
}
# the `kvmesh serve` backend has no router, no expected workers and no block hashes
CLUSTER_GAUGES = {
    "workers_alive": "Prefill and decode workers registered with the router now." + LAG,
    "workers_expected": "Prefill and decode workers the cluster's config starts.",
}
REUSE_WINDOW = 1 << 18  # block hashes the frontend remembers (~25 MB): 4M tokens of prefixes


class WorkerMetrics(NamedTuple):
    """One worker's entry: kvmesh_worker_*{worker, role} from the fields of its load."""

    worker: str
    role: str
    load: msgspec.Struct  # protocol.WorkerLoad; AsyncEngine's EngineStats in `kvmesh serve`


@dataclass(frozen=True)
class BackendMetrics:
    """What backend.metrics() returns: the backend's counters, each worker's load, and
    the KV tiers' counters summed per tier (none: no tiers)."""

    remote_prefill_total: int = 0
    kv_transfer_bytes_total: int = 0
    migrations_total: int = 0
    reusable_tokens_total: int = 0
    workers_alive: int = 0
    workers_expected: int = 0  # 0: not a cluster (no router, nothing expected)
    router: RouterLoad | None = None  # the router's last status of itself
    workers: list[WorkerMetrics] = field(default_factory=list)
    tiers: dict[Tier, TierCounters] = field(default_factory=dict)  # the tier stores'
    onboards: dict[Tier, OnboardCounters] = field(default_factory=dict)  # the workers'


class WorkerMetric(NamedTuple):
    """How one field of a worker's load is served: kvmesh_worker_<name>, a gauge, a
    counter (since the worker started; served as <name>_total), or untyped."""

    name: str
    kind: type  # GaugeMetricFamily, CounterMetricFamily or UnknownMetricFamily
    help: str


def gauge(name: str, help_text: str) -> WorkerMetric:
    return WorkerMetric(name, GaugeMetricFamily, help_text + LAG)


def counter(name: str, help_text: str) -> WorkerMetric:
    return WorkerMetric(name, CounterMetricFamily, help_text + LAG)


# field of a worker's load (protocol.WorkerLoad; EngineStats in `kvmesh serve`) ->
# kvmesh_worker_<name>{worker, role}
WORKER_METRICS = {
    "num_running": gauge("num_running", "Requests in the worker's running batch."),
    "num_waiting": gauge(
        "num_waiting", "Requests queued on the worker, waiting for room in its batch or KV pool."
    ),
    "num_remote": gauge(
        "num_remote",
        "Decode: prompts parked while a prefill worker computes "
        "them; prefill: prompts computed and held until their KV is sent.",
    ),
    "kv_usage": gauge("kv_usage", "Share of the worker's device KV pool in use, 0 to 1."),
    "queued_prefill_tokens": gauge(
        "queued_prefill_tokens", "Prompt tokens of the worker's waiting requests not computed yet."
    ),
    "prompt_tokens_total": counter(
        "prompt_tokens", "Prompt tokens of requests finished on the worker."
    ),
    "cached_tokens_total": counter(
        "cached_tokens",
        "Prompt tokens of requests finished on the worker that came from a KV cache, not computed.",
    ),
    "remote_prefills_total": counter(
        "remote_prefills",
        "Decode: its prompts prefilled on a "
        "prefill worker; prefill: prompts it prefilled for "
        "decode workers.",
    ),
    "transfer_bytes_total": counter(
        "transfer_bytes",
        "KV bytes the worker received (decode) or sent (prefill) on the data plane.",
    ),
    "preemptions_total": counter(
        "preemptions", "Sequences the worker preempted for KV room (recomputed later)."
    ),
}
# field of the router's RouterLoad -> kvmesh_router_<name>. Routing quality is
# cached_tokens_total (what the chosen decode workers held) next to
# best_cached_tokens_total (the most any alive decode worker held, per placement).
ROUTER_METRICS = {
    "routed_total": counter("routed", "Requests the router placed (a migration is placed again)."),
    "pending_tokens": gauge(
        "pending_tokens", "Tokens the router predicts on workers that have not reported since."
    ),
    "pending_placements": gauge(
        "pending_placements", "Placements whose request has not ended nor expired."
    ),
    "prompt_tokens_total": counter("prompt_tokens", "Prompt tokens of the requests placed."),
    "cached_tokens_total": counter(
        "cached_tokens",
        "Of those prompt tokens, the leading ones the chosen decode worker held (any tier): "
        "the prefix routing achieved.",
    ),
    "best_cached_tokens_total": counter(
        "best_cached_tokens",
        "Of those prompt tokens, the leading ones the best alive decode worker held (any "
        "tier) at each decision: the prefix routing could have achieved.",
    ),
    "remote_prefills_total": counter(
        "remote_prefills",
        "Placements with a prefill worker (the rest prefill on the decode worker).",
    ),
    "worker_deaths_total": counter(
        "worker_deaths", "Workers declared dead: silent past the liveness limit, not a Goodbye."
    ),
    "pool_routed_total": counter(
        "pool_routed",
        "Requests placed in each [[pools]] entry (by prompt length: the hybrid stack's "
        "decision), labelled with the pool.",
    ),
    "pool_fallbacks_total": counter(
        "pool_fallbacks",
        "Requests placed beyond the pool their length chose, which had no decode worker alive.",
    ),
}
# field of a worker's OnboardCounters (WorkerLoad.tiers[tier]) ->
# kvmesh_worker_<name>_total{worker, role, tier}. What the tiers themselves count (offloaded,
# lookups, hits) is the cache actor's, served per tier as kvmesh_kv_*{tier}.
WORKER_TIER_METRICS = {
    "onboarded": counter(
        "kv_onboard_blocks", "KV blocks the worker loaded from the tier instead of computing them."
    ),
    "failed": counter(
        "kv_onboard_failed_blocks",
        "KV blocks found in the tier that failed "
        "to load (gone, rewritten or corrupt since the lookup): computed.",
    ),
}


class Metrics:
    """The frontend's counters and histograms plus a live view of the backend's."""

    def __init__(self, backend, endpoints: tuple[str, ...] = ()) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BackendCollector(backend))
        r = self.registry
        self.requests = Counter(
            "kvmesh_requests",
            "HTTP completion requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        for endpoint in endpoints:  # served as 0 before the first: rate() has a series
            self.requests.labels(endpoint, "429")
        self.requests_running = Gauge(
            "kvmesh_requests_running",
            "Completion requests the frontend is serving now.",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvmesh_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.cached_tokens = Counter(
            "kvmesh_cached_tokens", "Prompt tokens served from the prefix cache.", registry=r
        )
        self.generation_tokens = Counter(
            "kvmesh_generation_tokens", "Tokens generated.", registry=r
        )
        self.time_to_first_token = Histogram(
            "kvmesh_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "kvmesh_inter_token_latency_seconds",
            "Between successive generated tokens of one request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_finished(self, num_prompt: int, num_cached: int, num_generated: int) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.cached_tokens.inc(num_cached)
        self.generation_tokens.inc(num_generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BackendCollector:
    """Reads backend.metrics() at each scrape."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def describe(self):
        return []  # do not call the backend at registration, before it has started

    def collect(self):
        stats = self.backend.metrics()
        for key, help_text in BACKEND_COUNTERS.items():
            yield CounterMetricFamily(f"kvmesh_{key}", help_text, value=getattr(stats, key))
        if stats.workers_expected:
            for key, help_text in CLUSTER_GAUGES.items():
                yield GaugeMetricFamily(f"kvmesh_{key}", help_text, value=getattr(stats, key))
        if stats.router is not None:
            yield from router_metrics(stats.router)
        yield from tier_metrics(stats.tiers, stats.onboards)
        yield from worker_metrics(stats.workers)


def router_metrics(load: RouterLoad):
    """Each field of the router's load as the metric ROUTER_METRICS names for it."""
    for name, value in msgspec.structs.asdict(load).items():
        metric = described(name, ROUTER_METRICS, "router")
        if isinstance(value, dict):  # per pool
            family = metric.kind(f"kvmesh_router_{metric.name}", metric.help, labels=["pool"])
            for pool, count in sorted(value.items()):
                family.add_metric([pool], count)
            yield family
            continue
        yield metric.kind(f"kvmesh_router_{metric.name}", metric.help, value=value)


def worker_metrics(workers: list[WorkerMetrics]):
    """Each numeric field of each worker's load as the metric WORKER_METRICS names for
    it, labelled with the worker and its role; each field of its per-tier counters as
    the one WORKER_TIER_METRICS names, labelled with the tier too."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily | UnknownMetricFamily] = {}

    def add(metric: WorkerMetric, labels: list[str], value: float) -> None:
        if metric.name not in families:
            names = ["worker", "role", "tier"][: len(labels)]
            families[metric.name] = metric.kind(
                f"kvmesh_worker_{metric.name}", metric.help, labels=names
            )
        families[metric.name].add_metric(labels, value)

    for worker, role, load in workers:
        for name, value in msgspec.structs.asdict(load).items():
            if isinstance(value, dict):
                for tier, counters in value.items():
                    for key, count in msgspec.structs.asdict(counters).items():
                        key_metric = described(key, WORKER_TIER_METRICS, "worker")
                        add(key_metric, [worker, role, tier], count)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                add(described(name, WORKER_METRICS, "worker"), [worker, role], value)
    yield from families.values()


def described(name: str, table: dict[str, WorkerMetric], owner: str) -> WorkerMetric:
    """The metric `table` names for a field; an untyped one that says so if none."""
    return table.get(name) or WorkerMetric(
        name,
        UnknownMetricFamily,
        f"Per-{owner} {name}, not described in kvmesh/frontend/metrics.py." + LAG,
    )


def tier_metrics(tiers: dict[Tier, TierCounters], onboards: dict[Tier, OnboardCounters]):
    """The KV cache tiers behind the device pools: blocks offloaded into each tier (by
    the tier stores) and onboarded from it (by the workers), and each tier's hit rate
    (blocks found / blocks looked up)."""
    offload = CounterMetricFamily(
        "kvmesh_kv_offload_blocks", "KV blocks offloaded into a tier." + TIER_LAG, labels=["tier"]
    )
    onboard = CounterMetricFamily(
        "kvmesh_kv_onboard_blocks",
        "KV blocks onboarded from a tier instead of recomputed." + TIER_LAG,
        labels=["tier"],
    )
    lookup = CounterMetricFamily(
        "kvmesh_kv_lookup_blocks",
        "KV blocks looked up in a tier (the disk: those the host tier lacked)." + TIER_LAG,
        labels=["tier"],
    )
    hit = CounterMetricFamily(
        "kvmesh_kv_hit_blocks", "Of those, blocks found in the tier." + TIER_LAG, labels=["tier"]
    )
    hit_rate = GaugeMetricFamily(
        "kvmesh_kv_hit_rate",
        "Blocks found in a tier / looked up, since the cache actors started." + TIER_LAG,
        labels=["tier"],
    )
    for tier in sorted(tiers.keys() | onboards.keys()):
        counters = tiers.get(tier, TierCounters())
        offload.add_metric([tier], counters.offloaded)
        onboard.add_metric([tier], onboards.get(tier, OnboardCounters()).onboarded)
        lookup.add_metric([tier], counters.lookups)
        hit.add_metric([tier], counters.hits)
        lookups = counters.lookups
        hit_rate.add_metric([tier], counters.hits / lookups if lookups else 0.0)
    yield from (offload, onboard, lookup, hit, hit_rate)


class ReuseMeter:
    """Counts the prompt tokens an unbounded prefix cache would serve: per request, its
    leading full blocks whose hash an earlier request had, among the last `window`
    distinct hashes seen (oldest forgotten first). Against the served cached tokens it
    tells a cache too small or a router that misses (LowCacheHitRate) from traffic that
    has no reuse to find."""

    def __init__(self, block_size: int, window: int = REUSE_WINDOW) -> None:
        self.block_size = block_size
        self.window = window
        self.seen: dict[int, None] = {}  # insertion order: oldest first
        self.reusable_tokens = 0

    def observe(self, block_hashes: list[int]) -> None:
        num_reused = 0
        while num_reused < len(block_hashes) and block_hashes[num_reused] in self.seen:
            num_reused += 1
        self.reusable_tokens += num_reused * self.block_size
        for block_hash in block_hashes:
            self.seen.pop(block_hash, None)  # re-inserted last: most recently seen
            self.seen[block_hash] = None
        while len(self.seen) > self.window:
            del self.seen[next(iter(self.seen))]
