"""What the many-node tests look at from outside a node: which addresses its sockets
listen on (/proc/net/tcp), which actor processes its launcher started (its log file's
actor_spawned lines), and what those left behind (processes, /dev/shm segments)."""

from __future__ import annotations

import os
import re
import socket
import struct
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def listening(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port` (0.0.0.0 for every interface)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        host, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(struct.pack("<I", int(host, 16))))
    return addresses


def spawned_pids(log: Path) -> dict[str, int]:
    """actor id -> pid of each actor process a launcher's log says it started (the last
    one of each id)."""
    found = re.findall(r"actor_spawned\s+actor=(\S+)\s+pid=(\d+)", log.read_text())
    return {actor: int(pid) for actor, pid in found}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"  # gone between the checks


def segments_of(pids: list[int]) -> list[str]:
    """The /dev/shm segments created by these processes (kvmesh-<actor>-<pid>-<random>)."""
    return sorted(path.name for pid in pids for path in SHM_DIR.glob(f"kvmesh-*-{pid}-*"))
