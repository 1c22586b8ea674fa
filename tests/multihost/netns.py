"""Hosts on one machine: network namespaces joined by a bridge, for multi-host tests and
for trying kvmesh on several "hosts" by hand (scripts/netns-hosts).

    kvm-<run>-sw   br0 ── a ─┐ ── b ─┐ ── c ─┐        (the switch: a bridge, no address)
                              │       │       │  veth pairs
    kvm-<run>-a   eth0 10.213.X.1     │       │
    kvm-<run>-b           eth0 10.213.X.2     │
    kvm-<run>-c                   eth0 10.213.X.3

Every interface is made inside a namespace of the run (`ip link add ... netns`), so the
root namespace gains nothing and traffic stays inside the run; deleting the run's
namespaces removes every link. X is picked from the run id among /24s the root
namespace does not route. A host's commands run under `ip netns exec` with a private
/dev/shm (a tmpfs of their own mount namespace), as on a real host: shared memory does
not reach another host, so KV between hosts takes the TCP data plane.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

PREFIX = "kvm-"
SUBNET = "10.213.{}.0/24"
HOST_NAMES = "abcdefgh"
# A host's command: its own mount namespace with a private /dev/shm, then the command.
PRIVATE_SHM = 'mount -t tmpfs -o mode=1777,size={} tmpfs /dev/shm && exec "$@"'


class NetnsError(RuntimeError):
    """A namespace, link or address could not be made; the message names the command."""


class QdiscUnknown(NetnsError):
    """The kernel lacks a tc qdisc (netem is a module some kernels leave out)."""


@dataclass(frozen=True)
class Host:
    """One namespace of a run: its name (a, b, ...), namespace and address."""

    name: str
    netns: str
    address: str


def ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def unused_subnet(seed: int) -> str:
    """A 10.213.X.0/24 the root namespace neither routes nor holds an address in."""
    routed = ip("-4", "route", "show", "table", "all") + ip("-4", "addr")
    taken = [
        ipaddress.ip_network(m, strict=False) for m in re.findall(r"\d+\.\d+\.\d+\.\d+/\d+", routed)
    ]
    for k in range(250):
        subnet = ipaddress.ip_network(SUBNET.format((seed + k) % 250 + 1))
        if not any(subnet.overlaps(net) for net in taken):
            return str(subnet)
    raise NetnsError("every 10.213.X.0/24 is routed in the root namespace")


class NetnsHosts:
    """`count` hosts in network namespaces of run `run` (kvm-<run>-a, ...), joined by a
    bridge in kvm-<run>-sw. create() makes them, close() removes them (also after a
    failed create); use it as a context manager."""

    def __init__(self, count: int, run: str | None = None, shm_size: str = "1g") -> None:
        if not 1 <= count <= len(HOST_NAMES):
            raise ValueError(f"count must be 1..{len(HOST_NAMES)}, got {count}")
        self.run = run or str(os.getpid())
        if not re.fullmatch(r"[0-9a-z]{1,8}", self.run):
            raise ValueError(
                f"run must be 1-8 of [0-9a-z] (a namespace name part), got {self.run!r}"
            )
        self.count = count
        self.shm_size = shm_size
        self.switch = f"{PREFIX}{self.run}-sw"
        self.hosts: list[Host] = []

    def __enter__(self) -> NetnsHosts:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> list[Host]:
        subnet = ipaddress.ip_network(unused_subnet(int(re.sub(r"\D", "", self.run) or 0)))
        ip("netns", "add", self.switch)
        ip("link", "set", "lo", "up", netns=self.switch)
        ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        ip("link", "set", "br0", "up", netns=self.switch)
        for i, name in enumerate(HOST_NAMES[: self.count]):
            host = Host(name, f"{PREFIX}{self.run}-{name}", str(subnet[i + 1]))
            ip("netns", "add", host.netns)
            self.hosts.append(host)
            ip(
                "link",
                "add",
                "eth0",
                "netns",
                host.netns,
                "type",
                "veth",
                "peer",
                "name",
                name,
                "netns",
                self.switch,
            )
            ip("link", "set", "dev", name, "master", "br0", netns=self.switch)
            ip("link", "set", "dev", name, "up", netns=self.switch)
            ip("link", "set", "lo", "up", netns=host.netns)
            ip("addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", "eth0", netns=host.netns)
            ip("link", "set", "eth0", "up", netns=host.netns)
        return self.hosts

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"host must be one of {[h.name for h in self.hosts]}, got {name!r}")

    def argv(self, name: str, command: list[str]) -> list[str]:
        """`command` as run on host `name`: in its namespace, with a private /dev/shm."""
        return [
            "ip", "netns", "exec", f"{PREFIX}{self.run}-{name}",
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", PRIVATE_SHM.format(self.shm_size), "sh", *command,
        ]  # fmt: skip

    def link(self, name: str, up: bool) -> None:
        """Take host `name`'s cable out of the switch (down) or put it back (up)."""
        ip("link", "set", name, "up" if up else "down", netns=self.switch)

    def shape(self, name: str, qdisc: str | None) -> None:
        """Degrade what host `name` sends with a tc qdisc ("netem delay 20ms loss 1%",
        "tbf rate 10mbit burst 32kbit latency 50ms"), or restore its link (None).
        Raises QdiscUnknown when this kernel lacks the qdisc."""
        netns = self.host(name).netns
        if qdisc is None:
            command = ["tc", "qdisc", "del", "dev", "eth0", "root"]
        else:
            command = ["tc", "qdisc", "replace", "dev", "eth0", "root", *qdisc.split()]
        done = subprocess.run(
            ["ip", "netns", "exec", netns, *command], capture_output=True, text=True
        )
        if "qdisc kind is unknown" in done.stderr:
            raise QdiscUnknown(
                f"this kernel has no {qdisc.split()[0]} qdisc (tc: {done.stderr.strip()})"
            )
        if qdisc is None and "handle of zero" in done.stderr:
            return  # nothing to remove: the link had its default qdisc
        if done.returncode != 0:
            raise NetnsError(f"`{' '.join(command)}` in {netns} failed: {done.stderr.strip()}")

    def close(self) -> None:
        remove_run(self.run)
        self.hosts = []


def runs() -> list[str]:
    """The runs whose switch namespace exists (kvm-<run>-sw)."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return sorted(m[1] for name in names if (m := re.fullmatch(rf"{PREFIX}(\w+)-sw", name)))


def remove_run(run: str, grace: float = 20.0) -> list[str]:
    """Delete run's namespaces, after SIGTERM (then, past `grace` s, SIGKILL) to any
    process still inside one; returns the namespaces removed."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    mine = [n for n in names if re.fullmatch(rf"{PREFIX}{re.escape(run)}-\w+", n)]
    pids = [int(p) for n in mine for p in ip("netns", "pids", n).split()]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while (
            pids := [p for p in pids if os.path.exists(f"/proc/{p}")]
        ) and time.monotonic() < deadline:
            time.sleep(0.1)
    for name in mine:
        ip("netns", "del", name)
    return mine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netns-hosts",
        description="Hosts on one machine for trying multi-host kvmesh: network namespaces "
        "kvm-RUN-a, -b, ... on a bridge (needs root, ip).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="make N hosts and print them")
    up.add_argument("count", type=int, help="how many hosts (1-8)")
    up.add_argument("--run", help="run id (default: this process's id)")
    run = sub.add_parser("exec", help="run a command on a host: its namespace, its own /dev/shm")
    run.add_argument("run", help="run id, as `up` printed it")
    run.add_argument("host", help="host name: a, b, ...")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    down = sub.add_parser("down", help="remove a run's hosts (stopping what runs there)")
    down.add_argument("run", nargs="?", help="run id (default: every run)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            hosts = NetnsHosts(args.count, args.run)
            with_cleanup = hosts.__enter__()
            for host in with_cleanup.hosts:
                print(f"host {host.name}: namespace {host.netns} address {host.address}")
            print(f"run {hosts.run}: `{sys.argv[0]} exec {hosts.run} a -- COMMAND` runs on host a")
            print(f"remove with: {sys.argv[0]} down {hosts.run}")
            return 0
        if args.action == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            argv = NetnsHosts(1, args.run).argv(args.host, command)
            os.execvp(argv[0], argv)
        for run in [args.run] if args.run else runs():
            print(f"run {run}: removed {' '.join(remove_run(run)) or 'nothing'}")
        return 0
    except (NetnsError, ValueError) as exc:
        print(f"netns-hosts: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
