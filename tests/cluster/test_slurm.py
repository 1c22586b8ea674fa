"""kvmesh under a real Slurm: scripts/slurm/local-cluster starts munged, slurmctld and two
slurmd (n1 at 127.0.0.1, n2 at 127.0.0.2) on this host; the test submits
scripts/slurm/kvmesh-nnode.sbatch on both nodes with the tiny model, reads where the
frontend listens from the job's stdout, talks to it with the official openai client
(outputs equal the in-process Engine's), sees both nodes in `kvmesh status`, then
scancels the job in the middle of a stream: the stream ends whole (the drain), the job
ends, and no kvmesh process or shared-memory segment of it is left. Slurm signals every
process of the job at once; the launchers still stop their actors in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh import SamplingParams
from kvmesh.bench.cluster import free_port_range
from tests.cluster.nodes import alive, segments_of, spawned_pids
from tests.polling import wait_until
from tests.prompts import random_prompt
from tests.tools import require_tools

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = ROOT / "scripts/slurm/local-cluster"
NNODE = ROOT / "scripts/slurm/kvmesh-nnode.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running two-node Slurm; yields the environment its commands need."""
    require_tools("slurmctld", "slurmd", "munged", "sbatch")
    if os.geteuid() != 0:
        reason = "the local Slurm needs root (slurmd runs jobs as their user)"
        if os.environ.get("KVMESH_REQUIRE_TOOLS") == "1":
            pytest.fail(f"KVMESH_REQUIRE_TOOLS=1 and {reason}")
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = os.environ | {
        "SLURM_CONF": str(state / "slurm.conf"),
        "KVMESH_SLURM_PORT": str(free_port_range(3)),
        "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin",
    }
    try:
        start = subprocess.run(
            [LOCAL_CLUSTER, "start", state], env=env, capture_output=True, text=True, timeout=90
        )
        assert start.returncode == 0, start.stdout + start.stderr
        yield env
    finally:
        stop = subprocess.run(
            [LOCAL_CLUSTER, "stop", state], env=env, capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stdout + stop.stderr


def squeue(env, job: str) -> str:
    done = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True
    )
    return done.stdout.strip()


def kvmesh_processes(marks: list[str]) -> list[str]:
    """Command lines of running processes that name one of `marks`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "kvmesh" in text and any(mark in text for mark in marks):
            found.append(text)
    return found


def test_nnode_sbatch_serves_on_two_nodes_and_scancel_drains(
    slurm, tmp_path, tiny_model_dir, engine, state_home
):
    import openai

    base = free_port_range(40)
    http_port = base + 30
    out = tmp_path / "job.out"
    env = slurm | {
        "KVMESH": f"{sys.executable} -m kvmesh",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "KVMESH_MODEL": str(tiny_model_dir),
        "KVMESH_PREFILL": "0",
        "KVMESH_DECODE": "1",
        "KVMESH_BASE_PORT": str(base),
        "KVMESH_HTTP_PORT": str(http_port),
        "KVMESH_KEY_DIR": str(tmp_path / "keys"),
        "KVMESH_SET": "kv.device_blocks=256 kv.host_gb=0.02",
    }
    submit = subprocess.run(
        ["sbatch", "--parsable", "-o", out, "-D", tmp_path, NNODE],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip()
    url = f"http://127.0.0.1:{http_port}/v1"
    try:
        for line in (f"kvmesh is up: {url}", "node n2 is up: cache-1, decode-1 registered"):
            wait_until(
                lambda line=line: out.exists() and line in out.read_text(),
                f"job {job} says {line!r} ({out})",
                timeout=240,
            )
        assert f"the frontend listens on {url} (node n1)" in out.read_text()

        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        prompts = [random_prompt(n, seed=n) for n in (30, 70)]
        for prompt, want in zip(prompts, engine.generate(prompts, greedy), strict=True):
            got = client.completions.create(
                model=tiny_model_dir.name,
                prompt=prompt,
                max_tokens=24,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            assert got.choices[0].text == want.text

        config = f"/tmp/kvmesh-slurm-{job}-n1.toml"
        status = subprocess.run(
            [sys.executable, "-m", "kvmesh", "status", "--json", "--config", config],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        rows = {row["actor"]: row for row in json.loads(status.stdout)}
        assert {(a, r["node"], r["health"]) for a, r in rows.items()} == {
            ("frontend-0", "n1", "alive"),
            ("router-0", "n1", "alive"),
            ("decode-0", "n1", "alive"),
            ("cache-0", "n1", "alive"),
            ("decode-1", "n2", "alive"),
            ("cache-1", "n2", "alive"),
        }
        # bound on 0.0.0.0 (the script's cluster.host), advertised at the node's address
        assert rows["decode-1"]["endpoints"]["from_peers"] == f"tcp://127.0.0.2:{base + 8}"
        assert rows["decode-0"]["endpoints"]["from_peers"] == f"tcp://127.0.0.1:{base + 4}"

        # scancel in the middle of a stream: the stream still ends whole
        stream = client.completions.create(
            model=tiny_model_dir.name,
            prompt=prompts[0],
            max_tokens=400,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = [next(iter(stream)).choices[0].text]
        subprocess.run(["scancel", job], env=env, check=True, timeout=30)
        pieces += [chunk.choices[0].text for chunk in stream if chunk.choices]
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        assert "".join(pieces) == engine.generate([prompts[0]], long)[0].text
        wait_until(lambda: squeue(env, job) == "", f"job {job} ends", timeout=90)
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)
        wait_until(lambda: squeue(env, job) == "", f"job {job} ends", timeout=90)

    logs = state_home / "kvmesh" / "logs"
    pids = [*spawned_pids(logs / "kvmesh-n1.log").values()]
    pids += spawned_pids(logs / "kvmesh-n2.log").values()
    assert len(pids) == 6, out.read_text()
    assert [pid for pid in pids if alive(pid)] == []
    assert segments_of(pids) == []
    assert kvmesh_processes([f"kvmesh-slurm-{job}-", f"cluster.base_port={base}"]) == []
    assert not Path(f"/tmp/kvmesh-slurm-{job}-n1.toml").exists()
    assert "Traceback" not in out.read_text(), out.read_text()[-4000:]
    # scancel's SIGTERM reached every process at once; the launchers still drained in
    # order (frontend, workers, router), so the frontend never lost its router
    assert "[warning" not in out.read_text(), out.read_text()[-4000:]
    assert "sigterm_left_to_launcher" in (logs / "kvmesh-n1.log").read_text()
