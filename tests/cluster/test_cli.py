"""`kvmesh up` and `kvmesh status` as a new user meets them: a clean terminal (the
answer and warnings only; info lines in the log file named at start), a clean shutdown
(every actor says Goodbye: no peer_dead or worker_dead warnings), actors that import
the installed kvmesh whatever the working directory, a launcher that stops an actor
crash loop with its last error, and a status that shows reachable addresses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvmesh.bench.cluster import free_port_range, start_cluster
from kvmesh.config import load_config
from kvmesh.config.topology import machine_overrides

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

FAKE_PACKAGE = 'raise ImportError("the kvmesh/ of the working directory was imported")\n'


def up(tmp_path, *args: str, cwd=None) -> tuple[subprocess.CompletedProcess, dict]:
    """`kvmesh up` on free ports, its state (log files) under tmp_path; returns the
    finished process and its environment."""
    base = free_port_range(24)
    env = os.environ | {"XDG_STATE_HOME": str(tmp_path / "state")}
    command = [
        sys.executable,
        "-P",
        "-m",
        "kvmesh",
        "up",
        "--set",
        f"cluster.base_port={base}",
        "--set",
        f"frontend.http_port={base + 22}",
        "--set",
        "kv.device_blocks=512",
        "--timeout",
        "240",
        *args,
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, cwd=cwd or tmp_path, env=env, timeout=500
    )
    return proc, {"port": base + 22, "log": tmp_path / "state/kvmesh/logs/kvmesh-local.log"}


def test_up_ask_once_prints_the_answer_only_and_shuts_down_quietly(tmp_path, tiny_model_dir):
    # started in a folder holding a kvmesh/ that would shadow the installed package
    (tmp_path / "kvmesh").mkdir()
    (tmp_path / "kvmesh" / "__init__.py").write_text(FAKE_PACKAGE)
    proc, where = up(tmp_path, "--model", str(tiny_model_dir), "--ask", "hi", "--once")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"log: {where['log']}  (-v shows info lines here)",
        "draining and stopping…",
    ]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"kvmesh is up: http://127.0.0.1:{where['port']}/v1")
    assert "you> hi" in lines and any(line.startswith("kvmesh> ") for line in lines)
    logged = where["log"].read_text()
    assert "[warning" not in logged and "peer_dead" not in logged, logged[-3000:]
    departures = {
        line.split("peer=")[1].split()[0]
        for line in logged.splitlines()
        if "peer_left" in line and "actor=router-0" in line
    }
    # the default cluster for this machine's cores (one worker on a few), all of it gone
    default = load_config(None, machine_overrides()).actors
    assert departures >= {spec.actor_id for spec in default if spec.role != "router"}


def test_an_actor_that_cannot_start_stops_up_with_its_last_error(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    proc, where = up(tmp_path, "--model", str(empty))
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = proc.stderr.split("kvmesh up: ", 1)[1]
    assert report.startswith("actor ")
    assert (
        " exited 3 times in a row within 60 s of starting (exit codes 1, 1, 1); "
        "not restarting it. Its last lines on stderr:\n" in report
    )
    assert f"ValueError: model path '{empty}' has no config.json" in report
    assert report.endswith(f"stopped the cluster; the log: {where['log']}\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """Actors bound to 0.0.0.0 (insecure: loopback tests only), reached at 127.0.0.1."""
    c = start_cluster(
        tmp_path_factory.mktemp("cluster"),
        tiny_model_dir,
        "cluster.host=0.0.0.0",
        "security.insecure=true",
    )
    yield c
    assert c.stop() == 0, c.log.read_text()[-3000:]


def status(cluster, *args: str) -> subprocess.CompletedProcess:
    """`kvmesh status` as a user types it: no log options."""
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", "status", *args, *cluster.args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_reachable_endpoints_and_no_log_lines(cluster):
    table, rows = status(cluster), status(cluster, "--json")
    assert (table.returncode, table.stderr, rows.returncode, rows.stderr) == (0, "", 0, "")
    endpoints = {row["actor"]: row["endpoint"] for row in json.loads(rows.stdout)}
    assert endpoints["frontend-0"] == f"{cluster.url}/v1"
    assert all(
        e.startswith("tcp://127.0.0.1:") for a, e in endpoints.items() if a != "frontend-0"
    ), endpoints
    assert "0.0.0.0" not in table.stdout
    frontend_row = next(line for line in table.stdout.splitlines() if "frontend-0" in line)
    assert frontend_row.endswith(f"  {cluster.url}/v1")
