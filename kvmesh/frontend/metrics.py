"""Prometheus metrics of one frontend, served as text on GET /metrics.

The frontend measures what it sees (requests, tokens, time to first token, time
between tokens); the backend's own counters and per-worker load are read from
backend.metrics() at scrape time, so they are never stale and never double-counted:

    kvmesh_remote_prefill_total, kvmesh_kv_transfer_bytes_total     (counters)
    kvmesh_worker_<key>{worker, role}   one gauge per numeric key of each worker entry

Each frontend has its own registry (no process-global state), so tests can run
several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BACKEND_COUNTERS = {
    "remote_prefill_total": "Prompts prefilled on a prefill worker, not the decode worker.",
    "kv_transfer_bytes_total": "KV-cache bytes moved between workers on the data plane.",
}


class Metrics:
    """The frontend's counters and histograms plus a live view of the backend's."""

    def __init__(self, backend) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BackendCollector(backend))
        r = self.registry
        self.requests = Counter(
            "kvmesh_requests", "HTTP completion requests by endpoint and status code.",
            ["endpoint", "status"], registry=r,
        )
        self.requests_running = Gauge(
            "kvmesh_requests_running", "Completion requests the frontend is serving now.",
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
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "kvmesh_inter_token_latency_seconds",
            "Between successive generated tokens of one request.",
            buckets=ITL_BUCKETS, registry=r,
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
        gauges: dict[str, GaugeMetricFamily] = {}
        for worker in stats.get("workers", []):
            labels = [str(worker.get("worker", "")), str(worker.get("role", ""))]
            for key, value in worker.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if key not in gauges:
                    gauges[key] = GaugeMetricFamily(
                        f"kvmesh_worker_{key}", f"Per-worker {key} (from the backend).",
                        labels=["worker", "role"],
                    )
                gauges[key].add_metric(labels, value)
        yield from gauges.values()


def tier_metrics(tiers: dict[str, dict[str, float]]):
    """The KV cache tiers behind the device pools: blocks offloaded and onboarded per
    tier, and each tier's hit rate (blocks found / blocks looked up)."""
    offload = CounterMetricFamily("kvmesh_kv_offload_blocks", "KV blocks offloaded into a tier.",
                                  labels=["tier"])
    onboard = CounterMetricFamily("kvmesh_kv_onboard_blocks",
                                  "KV blocks onboarded from a tier instead of recomputed.",
                                  labels=["tier"])
    hit_rate = GaugeMetricFamily("kvmesh_kv_hit_rate", "Blocks found in a tier / looked up.",
                                 labels=["tier"])
    for tier, counters in sorted(tiers.items()):
        offload.add_metric([tier], counters.get("offloaded", 0.0))
        onboard.add_metric([tier], counters.get("onboarded", 0.0))
        lookups = counters.get("lookups", 0.0)
        hit_rate.add_metric([tier], counters.get("hits", 0.0) / lookups if lookups else 0.0)
    yield from (offload, onboard, hit_rate)
