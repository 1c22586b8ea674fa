"""A whole cluster in subprocesses on 127.0.0.1 (`kvmesh up` with free ports), for the
serving tests and `kvmesh bench serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# The documented default's workers (1 prefill + 2 decode), whatever the machine: without
# a cluster.toml, `kvmesh up` on a few cores starts one worker (kvmesh.config.topology).
# Indices: the default node's entries are frontend, router, prefill, decode, cache.
DISAGGREGATED = ("nodes.0.actors.2.count=1", "nodes.0.actors.3.count=2")


def free_port_range(count: int) -> int:
    """A base port with `count` free ports above it (checked by binding each)."""
    for _ in range(50):
        # below Linux's ephemeral range (32768-60999), where outgoing connections take
        # their local ports and could steal ours between this check and the bind
        base = 20000 + (os.getpid() * 37 + int(time.time() * 1000)) % 12000
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            time.sleep(0.01)
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


@dataclass
class Cluster:
    process: subprocess.Popen
    url: str
    args: list[str]  # the --config/--set arguments that describe it
    log: Path

    def kvmesh(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kvmesh", "--log-level", "warning", *command, *self.args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, dict]:
        """`kvmesh status --json` by actor id (raises if the router does not answer)."""
        proc = self.kvmesh("status", "--json")
        if proc.returncode != 0:
            raise RuntimeError(f"kvmesh status failed: {proc.stderr}")
        return {row["actor"]: row for row in json.loads(proc.stdout)}

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_cluster(
    tmp_path: Path,
    model_dir: Path | None,
    *overrides: str,
    timeout: float = 240,
    python: str = sys.executable,
    config: Path | None = None,
) -> Cluster:
    """`kvmesh up` under `python` (another environment's, e.g. one with vLLM), healthy.
    `config`: a cluster.toml (its own [[models]] when model_dir is None)."""
    base = free_port_range(24)
    http_port = base + 22
    args = ["--config", str(config)] if config is not None else []
    args += [
        "--set",
        f"cluster.base_port={base}",
        "--set",
        f"frontend.http_port={http_port}",
        "--set",
        "kv.device_blocks=512",
    ]
    if model_dir is not None:
        args += ["--set", f"model.path={model_dir}"]
    for override in overrides:
        args += ["--set", override]
    log = tmp_path / "cluster.log"
    process = subprocess.Popen(
        [python, "-m", "kvmesh", "up", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    cluster = Cluster(process, f"http://127.0.0.1:{http_port}", args, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kvmesh up exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{cluster.url}/health", timeout=1).status_code == 200:
                return cluster
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"cluster not healthy in {timeout} s:\n{log.read_text()[-3000:]}")
