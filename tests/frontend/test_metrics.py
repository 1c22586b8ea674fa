"""kvmesh.frontend.metrics: every per-worker field of a load report is served as the
metric the tables name, with its type and a HELP line that says what it is and how far
it lags; the whole page passes `promtool check metrics` where promtool is installed."""

import shutil
import subprocess

import msgspec
import pytest

from kvmesh.engine.async_engine import EngineStats
from kvmesh.frontend.metrics import (
    LAG,
    ROUTER_METRICS,
    WORKER_METRICS,
    WORKER_TIER_METRICS,
    BackendMetrics,
    Metrics,
    ReuseMeter,
    WorkerMetrics,
)
from kvmesh.protocol import OnboardCounters, RouterLoad, TierCounters, WorkerLoad


class FixedBackend:
    """A Backend whose metrics() is fixed."""

    def __init__(self, stats: BackendMetrics) -> None:
        self.stats = stats

    def metrics(self) -> BackendMetrics:
        return self.stats


def make_load(**tiers: OnboardCounters) -> WorkerLoad:
    return WorkerLoad(
        num_running=2,
        num_waiting=1,
        num_remote=0,
        kv_usage=0.25,
        queued_prefill_tokens=40,
        prompt_tokens_total=300,
        cached_tokens_total=64,
        remote_prefills_total=3,
        transfer_bytes_total=4096,
        preemptions_total=1,
        tiers=tiers,
    )


def make_stats(*workers: WorkerMetrics) -> BackendMetrics:
    """backend.metrics() of a cluster whose workers last reported these loads (what the
    frontend actor builds from the router's status)."""
    return BackendMetrics(
        remote_prefill_total=3,
        kv_transfer_bytes_total=4096,
        workers=list(workers),
        tiers={"host": TierCounters(offloaded=5, lookups=8, hits=4)},
        onboards={"host": OnboardCounters(onboarded=4)},
    )


def render(stats: BackendMetrics) -> str:
    endpoints = ("/v1/chat/completions", "/v1/completions")
    return Metrics(FixedBackend(stats), endpoints).render().decode()


def comments(text: str, kind: str) -> dict[str, str]:
    """{metric: what its "# TYPE" (kind="TYPE") or "# HELP" line says}."""
    prefix = f"# {kind} "
    return dict(
        line[len(prefix) :].split(" ", 1) for line in text.splitlines() if line.startswith(prefix)
    )


CLUSTER = make_stats(
    WorkerMetrics(
        "decode-0",
        "decode",
        make_load(host=OnboardCounters(onboarded=4), disk=OnboardCounters(failed=1)),
    ),
    WorkerMetrics("prefill-0", "prefill", make_load()),
)


ROUTED = RouterLoad(
    routed_total=4,
    prompt_tokens_total=400,
    cached_tokens_total=96,
    best_cached_tokens_total=160,
    remote_prefills_total=3,
    worker_deaths_total=1,
)


def test_worker_series_are_typed_by_what_they_count():
    types = comments(render(CLUSTER), "TYPE")
    assert {name: kind for name, kind in types.items() if name.startswith("kvmesh_worker_")} == {
        "kvmesh_worker_num_running": "gauge",
        "kvmesh_worker_num_waiting": "gauge",
        "kvmesh_worker_num_remote": "gauge",
        "kvmesh_worker_kv_usage": "gauge",
        "kvmesh_worker_queued_prefill_tokens": "gauge",
        "kvmesh_worker_prompt_tokens_total": "counter",
        "kvmesh_worker_cached_tokens_total": "counter",
        "kvmesh_worker_remote_prefills_total": "counter",
        "kvmesh_worker_transfer_bytes_total": "counter",
        "kvmesh_worker_preemptions_total": "counter",
        "kvmesh_worker_kv_onboard_blocks_total": "counter",
        "kvmesh_worker_kv_onboard_failed_blocks_total": "counter",
    }
    assert types["kvmesh_remote_prefill_total"] == "counter"
    assert types["kvmesh_kv_transfer_bytes_total"] == "counter"
    assert types["kvmesh_kv_onboard_blocks_total"] == "counter"


def test_worker_values_keep_their_worker_role_and_tier():
    lines = render(CLUSTER).splitlines()
    for line in (
        'kvmesh_worker_num_running{role="decode",worker="decode-0"} 2.0',
        'kvmesh_worker_kv_usage{role="prefill",worker="prefill-0"} 0.25',
        'kvmesh_worker_prompt_tokens_total{role="decode",worker="decode-0"} 300.0',
        'kvmesh_worker_transfer_bytes_total{role="prefill",worker="prefill-0"} 4096.0',
        'kvmesh_worker_kv_onboard_blocks_total{role="decode",tier="host",worker="decode-0"} 4.0',
        'kvmesh_worker_kv_onboard_failed_blocks_total{role="decode",tier="disk",'
        'worker="decode-0"} 1.0',
        'kvmesh_kv_offload_blocks_total{tier="host"} 5.0',
        'kvmesh_kv_onboard_blocks_total{tier="host"} 4.0',
        'kvmesh_kv_hit_rate{tier="host"} 0.5',
    ):
        assert line in lines, line


def test_every_worker_help_says_what_it_is_and_that_it_lags():
    helps = comments(render(CLUSTER), "HELP")
    worker_helps = {name: text for name, text in helps.items() if name.startswith("kvmesh_worker_")}
    assert len(worker_helps) == 12
    for name, text in worker_helps.items():
        assert text.endswith(LAG), name
        assert len(text) > len(LAG) + 20, name  # a sentence, not just the field's name
    assert len(set(worker_helps.values())) == len(worker_helps)


def test_every_worker_load_field_and_tier_counter_is_described():
    # tiers: per tier, below; adapters: names (the router's), not a number to export
    fields = {f.name for f in msgspec.structs.fields(WorkerLoad)} - {"tiers", "adapters"}
    assert fields == WORKER_METRICS.keys()
    assert {f.name for f in msgspec.structs.fields(EngineStats)} <= WORKER_METRICS.keys()
    # what a worker's tier connector counts; the tiers' own counts are kvmesh_kv_*{tier}
    assert {f.name for f in msgspec.structs.fields(OnboardCounters)} == WORKER_TIER_METRICS.keys()


def test_the_in_process_engine_serves_the_clusters_metrics_and_no_others():
    stats = EngineStats(num_running=1, num_waiting=0, kv_usage=0.5, preemptions_total=2)
    text = render(BackendMetrics(workers=[WorkerMetrics("local", "local", stats)]))
    types = comments(text, "TYPE")
    assert {name for name in types if name.startswith("kvmesh_worker_")} == {
        "kvmesh_worker_num_running",
        "kvmesh_worker_num_waiting",
        "kvmesh_worker_kv_usage",
        "kvmesh_worker_preemptions_total",
    }
    assert types["kvmesh_worker_preemptions_total"] == "counter"
    assert 'kvmesh_worker_preemptions_total{role="local",worker="local"} 2.0' in text


class MysteryLoad(msgspec.Struct):
    mystery: int = 3
    up: bool = True
    name: str = "x"


def test_a_field_not_in_the_tables_is_served_untyped_and_says_so():
    text = render(BackendMetrics(workers=[WorkerMetrics("d0", "decode", MysteryLoad())]))
    assert comments(text, "TYPE")["kvmesh_worker_mystery"] == "untyped"
    assert (
        "not described in kvmesh/frontend/metrics.py"
        in comments(text, "HELP")["kvmesh_worker_mystery"]
    )
    assert "kvmesh_worker_up" not in text and "kvmesh_worker_name" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize(
    "stats",
    [
        CLUSTER,
        BackendMetrics(),
        BackendMetrics(router=ROUTED, workers_expected=3, workers_alive=3),
    ],
    ids=["cluster", "no workers", "router"],
)
def test_promtool_accepts_the_page(stats):
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=render(stats),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- what the alert rules and the dashboard read (deploy/prometheus, deploy/grafana) ---


def test_cluster_series_for_alerts_and_routing_quality():
    text = render(
        BackendMetrics(
            migrations_total=2,
            reusable_tokens_total=320,
            workers_alive=2,
            workers_expected=3,
            router=ROUTED,
            tiers=CLUSTER.tiers,
            onboards=CLUSTER.onboards,
        )
    )
    lines = text.splitlines()
    for line in (
        "kvmesh_migrations_total 2.0",
        "kvmesh_reusable_tokens_total 320.0",
        "kvmesh_workers_alive 2.0",
        "kvmesh_workers_expected 3.0",
        "kvmesh_router_routed_total 4.0",
        "kvmesh_router_prompt_tokens_total 400.0",
        "kvmesh_router_cached_tokens_total 96.0",
        "kvmesh_router_best_cached_tokens_total 160.0",
        "kvmesh_router_remote_prefills_total 3.0",
        "kvmesh_router_worker_deaths_total 1.0",
        "kvmesh_router_pending_tokens 0.0",
        'kvmesh_kv_lookup_blocks_total{tier="host"} 8.0',
        'kvmesh_kv_hit_blocks_total{tier="host"} 4.0',
        'kvmesh_requests_total{endpoint="/v1/chat/completions",status="429"} 0.0',
    ):
        assert line in lines, line


def test_every_router_load_field_is_described():
    assert {f.name for f in msgspec.structs.fields(RouterLoad)} == ROUTER_METRICS.keys()
    types = comments(render(BackendMetrics(router=RouterLoad())), "TYPE")
    assert types["kvmesh_router_best_cached_tokens_total"] == "counter"
    assert types["kvmesh_router_pending_tokens"] == "gauge"


def test_the_in_process_engine_has_no_cluster_series():
    text = render(BackendMetrics())
    for name in ("kvmesh_workers_alive", "kvmesh_workers_expected", "kvmesh_router_"):
        assert name not in text


@pytest.mark.parametrize(
    "requests, expected",
    [
        ([[1, 2, 3]], 0),
        ([[1, 2, 3], [1, 2, 4]], 2 * 16),  # two leading blocks seen before
        ([[1, 2, 3], [9, 2, 3]], 0),  # reuse is of a prefix: a new first block ends it
        ([[1, 2], [3, 4], [5, 6], [1, 2]], 0),  # window of 4: 1 and 2 were forgotten
        ([[1, 2], [3, 1], [4, 5], [1, 2]], 16),  # 1 seen again: it became the newest
    ],
)
def test_reuse_meter_counts_leading_blocks_seen_before(requests, expected):
    meter = ReuseMeter(block_size=16, window=4)
    for hashes in requests:
        meter.observe(hashes)
    assert meter.reusable_tokens == expected
