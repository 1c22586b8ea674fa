"""Launcher: `kvmesh up` starts this node's actors as processes and keeps them running.

Start order: router, then workers, then the frontend (each connects with retries,
so order only shortens start-up). Readiness: the frontend's /health answers 200,
which it does once every worker of the cluster has registered with the router.
Supervision: an actor that exits while the cluster runs is restarted after a
backoff (1 s, doubling to 30 s; reset once it has stayed up for 60 s), logged. One that
exits 3 times in a row within 60 s of its start cannot start (a broken install, model
path, device): supervise_once raises ActorFailedToStart with its last stderr lines, and
`kvmesh up` stops the cluster rather than restart it forever.
Actors run with Python's safe-path mode (-P): a `kvmesh/` folder in the working
directory must not shadow the installed package. Their stderr passes through the
launcher, which keeps each one's last lines for that report.
Shutdown (SIGINT/SIGTERM): SIGINT to the frontend first (it stops taking requests
and finishes its streams), then workers, then the router; each group gets the grace
period to drain, then SIGKILL. SIGINT, because a SIGTERM that reaches every process at
once (Slurm's scancel, systemd, `kill -- -PGID`) would drain them all together, the
router gone while the frontend still routes: an actor leaves SIGTERM to its live
launcher (`kvmesh actor --launcher PID`), and obeys it once the launcher is gone (the
parent-death signal). Nothing is left running, and no shared-memory segment of an actor
that had to be killed: the launcher unlinks them for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO

import structlog

from kvmesh.config import ActorSpec, ClusterConfig, ConfigError
from kvmesh.config.book import bind_host
from kvmesh.protocol import UNLOADED_EXIT

log = structlog.get_logger(__name__)

START_ORDER = {"router": 0, "cache": 1, "prefill": 2, "decode": 2, "frontend": 3, "planner": 4}
BACKOFF_START, BACKOFF_MAX, STABLE_AFTER = 1.0, 30.0, 60.0
MAX_START_FAILURES = 3  # exits in a row, each within STABLE_AFTER of its start
TAIL_LINES = 20  # of an actor's stderr, kept for ActorFailedToStart


class ActorFailedToStart(RuntimeError):
    """An actor exited MAX_START_FAILURES times in a row soon after starting."""

    def __init__(self, actor_id: str, codes: list[int], tail: list[str]) -> None:
        lines = "".join(f"  | {line}" for line in tail) or "  (it wrote nothing to stderr)\n"
        super().__init__(
            f"actor {actor_id} exited {len(codes)} times in a row within {STABLE_AFTER:.0f} s "
            f"of starting (exit codes {', '.join(map(str, codes))}); not restarting it. Its "
            f"last lines on stderr:\n{lines.rstrip()}"
        )
        self.actor_id = actor_id
        self.codes = codes
        self.tail = tail


@dataclass
class Child:
    spec: ActorSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    start_failures: int = 0  # exits in a row soon after starting
    unloaded_at: float | None = None  # exited as its model was unloaded: kept stopped
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    relay: threading.Thread | None = None  # copies the process's stderr to ours


class Launcher:
    def __init__(self, cfg: ClusterConfig, node: str, actor_args: list[str]) -> None:
        """actor_args: the global and config arguments every `kvmesh actor` child gets."""
        self.cfg = cfg
        self.node = node
        self.actor_args = actor_args
        specs = sorted(cfg.actors_on(node), key=lambda s: START_ORDER.get(s.role, 9))
        self.children = [Child(spec) for spec in specs]
        self.stopping = False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        command = [sys.executable, "-P", "-m", "kvmesh", *self.actor_args]
        command += ["--launcher", str(os.getpid()), child.spec.actor_id]
        # Own session: a terminal's Ctrl-C reaches only the launcher, which then stops
        # the actors in order. Parent-death signal: no actor outlives a killed launcher.
        child.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        child.tail = deque(maxlen=TAIL_LINES)
        child.relay = threading.Thread(
            target=_relay,
            args=(child.process.stderr, child.tail),
            name=f"stderr-{child.spec.actor_id}",
            daemon=True,
        )
        child.relay.start()
        log.info("actor_spawned", actor=child.spec.actor_id, pid=child.process.pid)

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is not None]

    def supervise_once(self) -> None:
        """Notice exits, schedule restarts with backoff, start those that are due.
        Raises ActorFailedToStart for an actor that keeps exiting soon after its start."""
        now = time.monotonic()
        for child in self.dead_children():
            code = child.process.returncode
            child.exits.append(code)
            _kill_group(child.process.pid)
            _release_segments(child.process.pid)
            child.process = None
            child.relay.join(timeout=2.0)  # its last lines: read the pipe to its end
            if code == UNLOADED_EXIT:  # not a failure: started again by load_models
                child.unloaded_at, child.start_failures = now, 0
                log.info("actor_unloaded", actor=child.spec.actor_id, model=child.spec.model)
                continue
            if now - child.started_at > STABLE_AFTER:
                child.backoff = BACKOFF_START
                child.start_failures = 0
            child.start_failures += 1
            if child.start_failures >= MAX_START_FAILURES:
                raise ActorFailedToStart(
                    child.spec.actor_id, child.exits[-child.start_failures :], list(child.tail)
                )
            child.restart_at = now + child.backoff
            log.warning(
                "actor_exited", actor=child.spec.actor_id, code=code, restart_in_s=child.backoff
            )
            child.backoff = min(child.backoff * 2, BACKOFF_MAX)
        for child in self.children:
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def load_models(self, asked_at: float | None, unloaded: frozenset[str]) -> None:
        """Start the actors that exited as their model was unloaded, once the router's
        answer to a question asked after that (`asked_at`, time.monotonic()) no longer
        lists their model as unloaded."""
        for child in self.children:
            if child.unloaded_at is None or asked_at is None or asked_at <= child.unloaded_at:
                continue
            if child.spec.model not in unloaded:
                log.info("actor_loading", actor=child.spec.actor_id, model=child.spec.model)
                child.unloaded_at = None
                self._spawn(child)

    def stop(self, grace: float) -> None:
        """Drain in reverse start order: frontend, workers, router; then SIGKILL leftovers."""
        self.stopping = True
        for order in sorted({START_ORDER.get(c.spec.role, 9) for c in self.children}, reverse=True):
            group = [
                c
                for c in self.children
                if START_ORDER.get(c.spec.role, 9) == order and c.process is not None
            ]
            for child in group:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + grace
            for child in group:
                try:
                    child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("actor_killed", actor=child.spec.actor_id, after_s=grace)
                    child.process.kill()
                    child.process.wait()
                _release_segments(child.process.pid)  # a killed one could not
        log.info("cluster_stopped")


def check_listen(cfg: ClusterConfig, node: str) -> None:
    """ConfigError unless this host can listen where `node`'s actors bind: its address
    from the address book (a host that lacks it is not that node), or every interface."""
    if cfg.cluster.ipc_dir:
        return
    n, entry = next((n, e) for n, e in enumerate(cfg.nodes) if e.name == node)
    host = bind_host(cfg.cluster.host, entry.address)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as exc:
        raise ConfigError(
            f"nodes.{n}.address: node {node}'s actors listen on {host}, which this host "
            f"cannot bind ({exc.strerror or exc}); expected `kvmesh up --node NAME` with "
            'the node whose address this host has, or cluster.host = "0.0.0.0" (every '
            "interface; peers are told the node's address)",
            f"nodes.{n}.address",
        ) from None


def _relay(stream: IO[str], tail: deque[str]) -> None:
    """Copy an actor's stderr to the launcher's line by line, keeping the last lines."""
    with stream:
        for line in stream:
            tail.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()


def _kill_group(pid: int) -> None:
    """What a dead actor started (vLLM's EngineCore, in the actor's own session and so
    its process group) dies with it: nothing is left holding memory or cores."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _release_segments(pid: int) -> None:
    """A killed actor cannot unlink its shared-memory KV pool: do it for it."""
    from kvmesh.kv.segment import unlink_segments_of  # numpy only: no torch, no numba

    for name in unlink_segments_of(pid):
        log.info("segment_released", pid=pid, segment=name)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM this process when the launcher dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: children are still stopped by stop(), just not on a SIGKILL
