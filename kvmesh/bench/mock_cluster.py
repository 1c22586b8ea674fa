"""A cluster of mock workers for the scale benchmarks: the real router in this process
(so its decisions can be timed where they are made), the real frontend in a
subprocess (`kvmesh actor frontend-0`), and N mock workers in one more subprocess
(kvmesh.bench.mock_host), all on ipc:// sockets in a temporary directory.

    async with MockCluster(model_dir, num_workers=100) as cluster:
        ... HTTP to cluster.url, model cluster.model; cluster.probe has the timings

RouterProbe wraps the live router's RouteRequest handler (the decision: candidate
list, KV index lookup, policy, bookkeeping, reply; no await inside, so its wall time
is its compute plus whatever preempted the process), its KV event intake and the
LoadReports it takes in, from outside: the router's code is unchanged. It keeps each
decision's wall time and its thread CPU time (the same without preemption by other
processes on shared cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvmesh.actors.router import RouterActor
from kvmesh.bench.cluster import free_port_range
from kvmesh.protocol import LoadReport, RouteRequest

START_TIMEOUT = 300.0  # a thousand workers register in about a minute on 2 busy cores
HEAD, MOCKS = "head", "mocks"


class RouterProbe:
    """Decision times (ns), KV events and LoadReports taken in by a live RouterActor."""

    def __init__(self, router: RouterActor) -> None:
        self.decisions_ns: list[int] = []
        self.decisions_cpu_ns: list[int] = []  # the same, in this thread's CPU time
        self.num_events = 0
        self.num_event_blocks = 0
        self.num_load_reports = 0
        self.placed: dict[str, int] = {}  # decode worker -> requests placed on it
        self.placed_tokens: dict[str, int] = {}  # decode worker -> uncached prompt tokens
        decide = router._handlers[RouteRequest]
        take_load = router._handlers[LoadReport]
        index = router._index

        async def timed(msg, inbound):
            start, cpu = time.perf_counter_ns(), time.thread_time_ns()
            reply = await decide(msg, inbound)
            self.decisions_cpu_ns.append(time.thread_time_ns() - cpu)
            self.decisions_ns.append(time.perf_counter_ns() - start)
            decode = getattr(reply, "decode", None)
            if decode is not None:
                self.placed[decode] = self.placed.get(decode, 0) + 1
                work = msg.num_prompt_tokens - reply.expected_cached_tokens
                self.placed_tokens[decode] = self.placed_tokens.get(decode, 0) + work
            return reply

        def counted(actor_id, event) -> None:
            self.num_events += 1
            self.num_event_blocks += len(getattr(event, "block_hashes", ()))
            index(actor_id, event)

        async def counted_load(msg, inbound):
            self.num_load_reports += 1
            return await take_load(msg, inbound)

        router._handlers[RouteRequest] = timed
        router._handlers[LoadReport] = counted_load
        router._index = counted

    def reset(self) -> None:
        self.decisions_ns = []
        self.decisions_cpu_ns = []
        self.placed = {}
        self.placed_tokens = {}
        self.num_events = self.num_event_blocks = self.num_load_reports = 0


def cluster_toml(
    model_dir: Path,
    ipc_dir: Path,
    http_port: int,
    num_workers: int,
    device_blocks: int,
    policy: str,
    max_num_seqs: int,
    load_weight: float = 1.0,
) -> str:
    """Two nodes on this host: head (frontend, router) and mocks (the decode workers)."""
    return f"""
[cluster]
name = "mock-scale"
ipc_dir = "{ipc_dir}"
heartbeat_interval = 2.0
liveness = 10

[model]
path = "{model_dir}"
engine = "mock"

[kv]
device_blocks = {device_blocks}

[router]
policy = "{policy}"
load_weight = {load_weight}

[frontend]
http_port = {http_port}
max_num_requests = 4096

[[nodes]]
name = "{HEAD}"
address = "127.0.0.1"
[[nodes.actors]]
role = "frontend"
[[nodes.actors]]
role = "router"

[[nodes]]
name = "{MOCKS}"
address = "127.0.0.1"
[[nodes.actors]]
role = "decode"
count = {num_workers}
max_num_seqs = {max_num_seqs}
"""


class MockCluster:
    """Router here, frontend and mock workers in subprocesses; see the module docstring."""

    def __init__(
        self,
        model_dir: Path,
        num_workers: int,
        *,
        device_blocks: int = 256,
        policy: str = "kv",
        max_num_seqs: int = 64,
        scale: float | None = None,
        load_weight: float = 1.0,
        load_report_interval: float = 0.5,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.num_workers = num_workers
        self.device_blocks = device_blocks
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.scale = scale
        self.load_weight = load_weight
        self.load_report_interval = load_report_interval
        self.url = ""
        self.model = ""
        self.router: RouterActor | None = None
        self.probe: RouterProbe | None = None
        self.processes: list[subprocess.Popen] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    async def __aenter__(self) -> MockCluster:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        from kvmesh.actors.roles import build_actor
        from kvmesh.config import load_config

        self._tmp = tempfile.TemporaryDirectory(prefix="kvmesh-scale-")
        tmp = Path(self._tmp.name)
        (tmp / "ipc").mkdir(mode=0o700)
        http_port = free_port_range(1)
        config = tmp / "cluster.toml"
        config.write_text(
            cluster_toml(
                self.model_dir,
                tmp / "ipc",
                http_port,
                self.num_workers,
                self.device_blocks,
                self.policy,
                self.max_num_seqs,
                self.load_weight,
            )
        )
        cfg = load_config(config)
        self.router = build_actor(cfg, "router-0")
        self.probe = RouterProbe(self.router)
        await self.router.start()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        log = (tmp / "processes.log").open("w")
        self.log_path = tmp / "processes.log"
        frontend = [sys.executable, "-m", "kvmesh", "--log-level", "warning", "actor"]
        self.processes.append(
            subprocess.Popen(
                [*frontend, "frontend-0", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        host = [sys.executable, "-m", "kvmesh.bench.mock_host", "--config", str(config)]
        if self.scale is not None:
            host += ["--scale", str(self.scale)]
        host += ["--load-report-interval", str(self.load_report_interval)]
        self.processes.append(
            subprocess.Popen(
                [*host, "--node", MOCKS], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        )
        self.url = f"http://127.0.0.1:{http_port}"
        await self._wait_healthy()
        async with httpx.AsyncClient() as http:
            self.model = (await http.get(f"{self.url}/v1/models")).json()["data"][0]["id"]

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                for process in self.processes:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"{process.args[2:4]} exited {process.returncode}:\n{self.tail()}"
                        )
                with contextlib.suppress(httpx.HTTPError):
                    health = await http.get(f"{self.url}/health", timeout=2)
                    if health.status_code == 200 and len(self.router.workers) == self.num_workers:
                        return
                await asyncio.sleep(0.5)
        raise RuntimeError(
            f"{len(self.router.workers)}/{self.num_workers} workers registered in "
            f"{START_TIMEOUT} s:\n{self.tail()}"
        )

    def tail(self) -> str:
        with contextlib.suppress(OSError, AttributeError):
            return self.log_path.read_text()[-3000:]
        return ""

    async def __aexit__(self, *exc_info) -> None:
        for process in reversed(self.processes):  # workers first: they say Goodbye
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in reversed(self.processes):
            try:
                await asyncio.to_thread(process.wait, 60)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self.router is not None:
            await self.router.close()
        if self._tmp is not None:
            self._tmp.cleanup()
