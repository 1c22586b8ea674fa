"""Prometheus metrics of one frontend, served as text on GET /metrics.

The frontend measures what it sees (requests, tokens, time to first token, time
between tokens) as it happens. Everything else comes from backend.metrics() at scrape
time, which in a cluster is the router's last status: each worker reports its load
(LoadReport) every `load_report_interval` (0.5 s) and at once when its queues change,
the cache actor its tier counters every second, and the frontend polls the router every
`status_interval` (0.5 s). So those series lag what happened by up to about a second
(1.5 s for the tiers); a request that has just ended may not be counted yet.

    kvmesh_remote_prefill_total, kvmesh_kv_transfer_bytes_total     (counters)
    kvmesh_kv_{offload,onboard}_blocks_total{tier}, kvmesh_kv_hit_rate{tier}
    kvmesh_worker_<metric>{worker, role}     one per field of WORKER_METRICS: gauges of
                                             load, <metric>_total counters since start
    kvmesh_worker_kv_*_blocks_total{worker, role, tier}   WORKER_TIER_METRICS

WORKER_METRICS and WORKER_TIER_METRICS are the one place that names each field of a
worker's load, its type and its meaning; a field missing from them is still served, as
an untyped kvmesh_worker_<field> that says so.

Each frontend has its own registry (no process-global state), so tests can run
several apps in one process.
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, UnknownMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# backend.metrics() in a cluster is the router's last status (see the module doc)
LAG = " In a cluster, from load reports: up to ~1 s behind."
TIER_LAG = " From the workers' and cache actors' reports: up to ~1.5 s behind."
BACKEND_COUNTERS = {
    "remote_prefill_total": "Prompts prefilled on a prefill worker, not the decode worker." + LAG,
    "kv_transfer_bytes_total": "KV-cache bytes moved between workers on the data plane." + LAG,
}
TIERS = ("host", "disk")


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


PREEMPTIONS = counter(
    "preemptions", "Sequences the worker preempted for KV room (recomputed later)."
)
# field of a worker's load (protocol.LoadReport; AsyncEngine.stats in `kvmesh serve`) ->
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
    "preemptions_total": PREEMPTIONS,
    "num_preemptions": PREEMPTIONS,  # the in-process engine's name for it
}
# <field>_<tier> of a worker's load -> kvmesh_worker_<name>_total{worker, role, tier}.
# offloaded, lookups and hits come only from an in-process tier: in a cluster the cache
# actor counts them, in kvmesh_kv_*{tier}.
WORKER_TIER_METRICS = {
    "onboarded": counter(
        "kv_onboard_blocks", "KV blocks the worker loaded from the tier instead of computing them."
    ),
    "failed": counter(
        "kv_onboard_failed_blocks",
        "KV blocks found in the tier that failed "
        "to load (gone, rewritten or corrupt since the lookup): computed.",
    ),
    "offloaded": counter("kv_offload_blocks", "KV blocks the worker offloaded into the tier."),
    "lookups": counter("kv_lookup_blocks", "KV blocks the worker looked up in the tier."),
    "hits": counter("kv_hit_blocks", "KV blocks the worker found in the tier."),
}
TIER_FIELDS = {
    f"{field}_{tier}": (WORKER_TIER_METRICS[field], tier)
    for field in WORKER_TIER_METRICS
    for tier in TIERS
}


class Metrics:
    """The frontend's counters and histograms plus a live view of the backend's."""

    def __init__(self, backend) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BackendCollector(backend))
        r = self.registry
        self.requests = Counter(
            "kvmesh_requests",
            "HTTP completion requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
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
            yield CounterMetricFamily(f"kvmesh_{key}", help_text, value=stats.get(key, 0))
        yield from tier_metrics(stats.get("tiers", {}))
        yield from worker_metrics(stats.get("workers", []))


def worker_metrics(workers: list[dict]):
    """Each numeric field of each worker entry as the metric WORKER_METRICS or
    TIER_FIELDS names for it, labelled with the worker, its role (and the tier)."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily | UnknownMetricFamily] = {}
    for worker in workers:
        labels = [str(worker.get("worker", "")), str(worker.get("role", ""))]
        for key, value in worker.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, tier = WORKER_METRICS.get(key), None
            if metric is None and key in TIER_FIELDS:
                metric, tier = TIER_FIELDS[key]
            if metric is None:
                metric = WorkerMetric(
                    key,
                    UnknownMetricFamily,
                    f"Per-worker {key}, not described in kvmesh/frontend/metrics.py." + LAG,
                )
            if metric.name not in families:
                families[metric.name] = metric.kind(
                    f"kvmesh_worker_{metric.name}",
                    metric.help,
                    labels=["worker", "role"] if tier is None else ["worker", "role", "tier"],
                )
            families[metric.name].add_metric(labels if tier is None else [*labels, tier], value)
    yield from families.values()


def tier_metrics(tiers: dict[str, dict[str, float]]):
    """The KV cache tiers behind the device pools: blocks offloaded and onboarded per
    tier, and each tier's hit rate (blocks found / blocks looked up)."""
    offload = CounterMetricFamily(
        "kvmesh_kv_offload_blocks", "KV blocks offloaded into a tier." + TIER_LAG, labels=["tier"]
    )
    onboard = CounterMetricFamily(
        "kvmesh_kv_onboard_blocks",
        "KV blocks onboarded from a tier instead of recomputed." + TIER_LAG,
        labels=["tier"],
    )
    hit_rate = GaugeMetricFamily(
        "kvmesh_kv_hit_rate", "Blocks found in a tier / looked up." + TIER_LAG, labels=["tier"]
    )
    for tier, counters in sorted(tiers.items()):
        offload.add_metric([tier], counters.get("offloaded", 0.0))
        onboard.add_metric([tier], counters.get("onboarded", 0.0))
        lookups = counters.get("lookups", 0.0)
        hit_rate.add_metric([tier], counters.get("hits", 0.0) / lookups if lookups else 0.0)
    yield from (offload, onboard, hit_rate)
