"""kvmesh.frontend.metrics: every per-worker field of a load report is served as the
metric the tables name, with its type and a HELP line that says what it is and how far
it lags; the whole page passes `promtool check metrics` where promtool is installed."""

import shutil
import subprocess

import msgspec
import pytest

from kvmesh.actors.router import _load_dict
from kvmesh.cache.store import STORE_TIERS, TierStats
from kvmesh.frontend.metrics import (
    LAG,
    TIERS,
    WORKER_METRICS,
    WORKER_TIER_METRICS,
    Metrics,
)
from kvmesh.protocol import LoadReport


class FixedBackend:
    """A Backend whose metrics() is a fixed dict."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats

    def metrics(self) -> dict:
        return self.stats


def make_report(**tiers: float) -> LoadReport:
    return LoadReport(
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


def make_stats(*workers: tuple[str, str, LoadReport]) -> dict:
    """backend.metrics() of a cluster whose workers last reported these loads (what the
    frontend actor builds from the router's status)."""
    return {
        "remote_prefill_total": 3,
        "kv_transfer_bytes_total": 4096,
        "workers": [
            {"worker": w, "role": role, **_load_dict(report)} for w, role, report in workers
        ],
        "tiers": {"host": {"offloaded": 5.0, "onboarded": 4.0, "lookups": 8.0, "hits": 4.0}},
    }


def render(stats: dict) -> str:
    return Metrics(FixedBackend(stats)).render().decode()


def comments(text: str, kind: str) -> dict[str, str]:
    """{metric: what its "# TYPE" (kind="TYPE") or "# HELP" line says}."""
    prefix = f"# {kind} "
    return dict(
        line[len(prefix) :].split(" ", 1) for line in text.splitlines() if line.startswith(prefix)
    )


CLUSTER = make_stats(
    ("decode-0", "decode", make_report(onboarded_host=4.0, failed_disk=1.0)),
    ("prefill-0", "prefill", make_report()),
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


def test_every_load_report_field_and_tier_counter_is_described():
    fields = {f.name for f in msgspec.structs.fields(LoadReport)} - {"tiers"}
    assert fields <= WORKER_METRICS.keys()
    # what a worker's tier connector counts: the store's counters, onboarded and failed
    assert {*TierStats().counters(), "onboarded", "failed"} == WORKER_TIER_METRICS.keys()
    assert TIERS == STORE_TIERS


def test_the_in_process_engines_preemptions_share_the_clusters_metric():
    stats = {"workers": [{"worker": "local", "role": "local", "num_preemptions": 2}]}
    text = render(stats)
    assert "# TYPE kvmesh_worker_preemptions_total counter" in text
    assert 'kvmesh_worker_preemptions_total{role="local",worker="local"} 2.0' in text


def test_a_field_not_in_the_tables_is_served_untyped_and_says_so():
    stats = {"workers": [{"worker": "d0", "role": "decode", "mystery": 3, "up": True, "name": "x"}]}
    text = render(stats)
    assert comments(text, "TYPE")["kvmesh_worker_mystery"] == "untyped"
    assert (
        "not described in kvmesh/frontend/metrics.py"
        in comments(text, "HELP")["kvmesh_worker_mystery"]
    )
    assert "kvmesh_worker_up" not in text and "kvmesh_worker_name" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize("stats", [CLUSTER, {"workers": []}], ids=["cluster", "no workers"])
def test_promtool_accepts_the_page(stats):
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=render(stats),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
