"""Slurm: the cluster of a job allocation, so a user edits roles and counts, not host lists.

`kvmesh up --slurm` (or plain `kvmesh up` under srun) on every node of a job:

    nodes     `scontrol show hostnames $SLURM_JOB_NODELIST`, in that order; each node's
              address is its NodeAddr (`scontrol -o show node`), resolved to an IP
    this node SLURM_NODEID (0-based, into that list); missing or out of range is an
              error, never a silent "first node"; SLURM_LOCALID > 0 (two tasks on one
              node: srun -n2 without -N2) is an error too
    roles     cluster.toml's [[nodes]] entries are templates, their name and address
              replaced by the allocation's: node i of the job runs entry i's actors, and
              every node past the last entry runs the last entry's, less its frontend
              and router (one router per cluster; the frontend on the first node)

So the default cluster.toml (one node: frontend, router, prefill, 2 decode, cache) on a
3-node job gives n1 everything and n2, n3 each a prefill, 2 decode workers and a cache.
Every node derives the same cluster from the same job, and its actors get that cluster
as a file (kvmesh actor --config FILE).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from kvmesh.config.book import check
from kvmesh.config.loading import config_to_toml
from kvmesh.config.schema import ClusterConfig, ConfigError, NodeConfig

LEADER_ROLES = ("frontend", "router")  # on the first node only, past the templates
Run = Callable[[list[str]], str]  # runs a command, returns its stdout


@dataclass(frozen=True)
class Allocation:
    """The nodes of a Slurm job and which of them this process runs on."""

    job_id: str
    names: tuple[str, ...]  # host names, in the allocation's order
    addresses: tuple[str, ...]  # their IP addresses, same order
    index: int  # this node's, from SLURM_NODEID

    @property
    def node(self) -> str:
        return self.names[self.index]


def under_srun(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a task of a Slurm job step (srun), where `kvmesh up`
    takes its nodes from the allocation unless told --node or --no-slurm."""
    return bool(env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"))


def run_scontrol(args: list[str]) -> str:
    try:
        done = subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise ConfigError("--slurm: scontrol not found on PATH (is this a Slurm node?)") from None
    if done.returncode != 0:
        raise ConfigError(
            f"--slurm: `scontrol {' '.join(args)}` failed ({done.returncode}): "
            f"{done.stderr.strip()}"
        )
    return done.stdout


def discover(env: Mapping[str, str] = os.environ, run: Run = run_scontrol) -> Allocation:
    """This job's allocation, from the environment srun gives a task and scontrol."""

    def need(name: str) -> str:
        value = env.get(name, "")
        if not value:
            raise ConfigError(
                f"--slurm: ${name} is not set; expected `kvmesh up --slurm` to run as a task "
                "of a Slurm job, one per node (srun --ntasks-per-node=1 kvmesh up --slurm)",
                name,
            )
        return value

    job_id, nodelist, node_id = need("SLURM_JOB_ID"), need("SLURM_JOB_NODELIST"), None
    local_id = env.get("SLURM_LOCALID", "0")
    if local_id != "0":
        raise ConfigError(
            f"--slurm: SLURM_LOCALID is {local_id!r}: several kvmesh tasks on one node "
            "would start the same actors twice; expected one task per node "
            "(srun --ntasks-per-node=1)",
            "SLURM_LOCALID",
        )
    names = tuple(run(["show", "hostnames", nodelist]).split())
    node_id = need("SLURM_NODEID")
    if not node_id.isdigit() or int(node_id) >= len(names):
        raise ConfigError(
            f"--slurm: SLURM_NODEID is {node_id!r}; expected an integer from 0 to "
            f"{len(names) - 1} (the job's nodes: {', '.join(names)})",
            "SLURM_NODEID",
        )
    index = int(node_id)
    here = env.get("SLURMD_NODENAME")
    if here and here != names[index]:
        raise ConfigError(
            f"--slurm: SLURM_NODEID {index} is {names[index]} in the job's node list, but "
            f"this is {here} (SLURMD_NODENAME); expected the step to span the whole "
            "allocation (srun without -N/--nodelist narrowing it)",
            "SLURM_NODEID",
        )
    addresses = node_addresses(names, run)
    return Allocation(job_id, names, tuple(resolve(addresses[name]) for name in names), index)


def node_addresses(names: tuple[str, ...], run: Run) -> dict[str, str]:
    """NodeAddr of each node (`scontrol -o show node`; the name itself where it has none)."""
    addresses = {name: name for name in names}
    for line in run(["-o", "show", "node", ",".join(names)]).splitlines():
        fields = dict(item.partition("=")[::2] for item in line.split())
        if fields.get("NodeName") in addresses and fields.get("NodeAddr"):
            addresses[fields["NodeName"]] = fields["NodeAddr"]
    return addresses


def resolve(host: str) -> str:
    """host as an IP address (what peers dial and a node binds)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise ConfigError(f"--slurm: node address {host!r} does not resolve: {exc}") from None


def cluster_for(cfg: ClusterConfig, allocation: Allocation) -> ClusterConfig:
    """cfg with its [[nodes]] templates laid over the allocation's nodes, checked."""
    templates = cfg.nodes
    nodes = []
    for i, (name, address) in enumerate(zip(allocation.names, allocation.addresses, strict=True)):
        template = templates[min(i, len(templates) - 1)]
        actors = template.actors
        if i >= len(templates):
            actors = tuple(group for group in actors if group.role not in LEADER_ROLES)
        nodes.append(NodeConfig(name, address, actors))
    cluster = msgspec.structs.replace(cfg, nodes=tuple(nodes))
    check(cluster, f"slurm job {allocation.job_id} ({len(nodes)} node{'s' * (len(nodes) != 1)}): ")
    return cluster


def write_cluster(cfg: ClusterConfig, allocation: Allocation) -> Path:
    """The cluster as a file this node's actors load: private to this user."""
    path = Path(tempfile.gettempdir()) / f"kvmesh-slurm-{allocation.job_id}-{allocation.node}.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(config_to_toml(cfg, comments=False))
    return path


@dataclass(frozen=True)
class JobCluster:
    """This job's cluster, this node's place in it, and the file its actors load."""

    cluster: ClusterConfig
    allocation: Allocation
    path: Path

    @classmethod
    def of(cls, cfg: ClusterConfig) -> JobCluster:
        allocation = discover()
        cluster = cluster_for(cfg, allocation)
        return cls(cluster, allocation, write_cluster(cluster, allocation))

    @property
    def banner(self) -> str:
        """What the node prints at start: where it is, and where the frontend listens."""
        a = self.allocation
        frontend = next(spec for spec in self.cluster.actors if spec.role == "frontend")
        return (
            f"slurm job {a.job_id}: node {a.node} ({a.index + 1} of {len(a.names)}: "
            f"{', '.join(a.names)}); the frontend listens on {self.cluster.frontend_url}/v1 "
            f"(node {frontend.node}); `kvmesh status --config {self.path}` on this node "
            "shows the cluster"
        )
