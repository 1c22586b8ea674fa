"""NVIDIA's aiperf (0.13.0, in its own venv: scripts/install-aiperf) runs unchanged
against a kvmesh cluster, as Dynamo users run it: `aiperf profile --endpoint-type
chat|completions --streaming --tokenizer <model dir>`. Every request succeeds and the
report has TTFT and inter-token latency for each.

aiperf is found at $KVMESH_AIPERF, /opt/aiperf/bin/aiperf, the user's
$XDG_DATA_HOME/kvmesh/aiperf/bin/aiperf, or on PATH; without it the tests skip naming it
(fail under KVMESH_REQUIRE_TOOLS=1, as in CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from kvmesh.bench.cluster import start_cluster
from tests.tools import require_tools

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NUM_REQUESTS = 8
OUTPUT_TOKENS = 16


def aiperf_executable() -> str:
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    candidates = [
        os.environ.get("KVMESH_AIPERF", ""),
        "/opt/aiperf/bin/aiperf",
        str(data_home / "kvmesh" / "aiperf" / "bin" / "aiperf"),
        shutil.which("aiperf") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    require_tools("aiperf")  # skips (or fails in CI) naming it
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    aiperf_executable()
    # one aggregated decode worker: what aiperf measures here is the API, not the split
    c = start_cluster(
        tmp_path_factory.mktemp("aiperf"),
        tiny_model_dir,
        "nodes.0.actors.2.count=0",  # no prefill worker
        "nodes.0.actors.3.count=1",  # one decode worker
    )
    yield c
    c.stop()


# ~40 s of aiperf each on 2 cores (mostly its own start): the chat run is in the default
# suite, the completions run is `slow` (pytest -m slow tests/monitoring)
@pytest.mark.parametrize(
    "endpoint_type", ["chat", pytest.param("completions", marks=pytest.mark.slow)]
)
def test_aiperf_profiles_a_cluster_with_every_request_succeeding(
    endpoint_type, cluster, tiny_model_dir, tmp_path
):
    model = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["id"]
    artifacts = tmp_path / "artifacts"
    command = [
        aiperf_executable(),
        "profile",
        "--model", model,
        "--url", cluster.url,
        "--endpoint-type", endpoint_type,
        "--streaming",
        "--tokenizer", str(tiny_model_dir),
        "--request-count", str(NUM_REQUESTS),
        "--concurrency", "2",
        "--synthetic-input-tokens-mean", "48",
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(OUTPUT_TOKENS),
        "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true",
        "--random-seed", "1",
        "--artifact-dir", str(artifacts),
        "--ui-type", "none",
        "--no-gpu-telemetry",
        "--no-server-metrics",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    assert report["is_complete"] and not report["was_cancelled"]
    assert report["error_summary"] == []
    assert report["request_count"]["avg"] == NUM_REQUESTS
    assert report["completed_request_count"]["avg"] == NUM_REQUESTS
    assert report["request_error_rate"]["avg"] == 0.0
    # the server's usage: every request ran to max_tokens (ignore_eos)
    assert report["usage_completion_tokens"]["sum"] == NUM_REQUESTS * OUTPUT_TOKENS
    for metric in ("time_to_first_token", "inter_token_latency"):
        stats = report[metric]
        assert stats["unit"] == "ms" and stats["count"] == NUM_REQUESTS, (metric, stats)
        assert 0 < stats["p50"] <= stats["p99"], (metric, stats)
    records = [
        json.loads(line)
        for line in (artifacts / "profile_export.jsonl").read_text().splitlines()
        if line
    ]
    assert len(records) == NUM_REQUESTS
    assert [r for r in records if r.get("error")] == []
