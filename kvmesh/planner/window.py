"""Latency quantiles over the planner's last interval, from a frontend's /metrics.

The frontend's histograms (kvmesh_time_to_first_token_seconds,
kvmesh_inter_token_latency_seconds) are cumulative since it started; the planner keeps
the previous scrape's bucket counts and takes the quantile of the difference, linearly
interpolated inside the bucket that holds it (as Prometheus' histogram_quantile does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

TTFT = "kvmesh_time_to_first_token_seconds"
ITL = "kvmesh_inter_token_latency_seconds"

Buckets = dict[float, float]  # upper bound (le) -> cumulative count


def histogram_buckets(text: str, name: str) -> Buckets:
    """The cumulative buckets of histogram `name` in Prometheus text (summed over
    label sets other than le); empty when absent."""
    buckets: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of cumulative `buckets`; None without samples. Past the last
    finite bound: that bound (what is known)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


@dataclass
class LatencyWindow:
    """The previous scrape's buckets per histogram; `observe` returns the interval's
    quantile of each and remembers the new counts."""

    q: float
    previous: dict[str, Buckets] = field(default_factory=dict)

    def observe(self, text: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in (TTFT, ITL):
            now = histogram_buckets(text, name)
            before = self.previous.get(name, {})
            # a restarted frontend counts from 0 again: take its counts as they are
            restarted = any(now.get(le, 0.0) < count for le, count in before.items())
            delta = now if restarted else {le: c - before.get(le, 0.0) for le, c in now.items()}
            self.previous[name] = now
            out[name] = quantile(self.q, delta)
        return out
