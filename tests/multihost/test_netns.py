"""The namespace harness alone: hosts reach each other's addresses over the bridge (and
nothing lands in the root namespace), each host's commands get a /dev/shm of their own,
and every namespace of a run is gone after close, also when create failed halfway."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.multihost.netns import NetnsError, NetnsHosts, ip
from tests.tools import require_tools

CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)"
LISTEN = (
    "import socket, sys; s = socket.create_server((sys.argv[1], 0)); "
    "print(s.getsockname()[1], flush=True); s.accept()"
)


@pytest.fixture(autouse=True)
def root_and_ip():
    require_tools("ip", "unshare")
    if os.geteuid() != 0:
        reason = "network namespaces need root"
        if os.environ.get("KVMESH_REQUIRE_TOOLS") == "1":
            pytest.fail(f"KVMESH_REQUIRE_TOOLS=1 and {reason}")
        pytest.skip(reason)


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def test_hosts_reach_each_other_and_are_removed_after():
    root_links = ip("-o", "link")
    with NetnsHosts(2, run=f"t{os.getpid() % 10**6}") as hosts:
        a, b = hosts.hosts
        assert [(h.name, h.netns) for h in hosts.hosts] == [
            ("a", f"kvm-{hosts.run}-a"),
            ("b", f"kvm-{hosts.run}-b"),
        ]
        assert {hosts.switch, a.netns, b.netns} <= namespaces()
        server = subprocess.Popen(
            hosts.argv("b", [sys.executable, "-c", LISTEN, b.address]),
            stdout=subprocess.PIPE,
            text=True,
        )
        port = server.stdout.readline().strip()
        client = subprocess.run(
            hosts.argv("a", [sys.executable, "-c", CONNECT, b.address, port]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert client.returncode == 0, client.stderr
        assert server.wait(timeout=30) == 0
        shm = subprocess.run(
            hosts.argv("a", ["sh", "-c", "touch /dev/shm/kvm-test-mark && ls /dev/shm"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shm.stdout.split() == ["kvm-test-mark"], shm.stderr
        assert not os.path.exists("/dev/shm/kvm-test-mark")  # a's own /dev/shm
        assert ip("-o", "link") == root_links  # every link inside the run's namespaces
    assert {n for n in namespaces() if n.startswith(f"kvm-{hosts.run}-")} == set()


def test_a_failed_create_leaves_nothing():
    run = f"f{os.getpid() % 10**6}"
    ip("netns", "add", f"kvm-{run}-b")  # taken: making host b fails
    with pytest.raises(NetnsError, match=f"`ip netns add kvm-{run}-b` failed"):
        with NetnsHosts(3, run=run):
            pass
    assert {n for n in namespaces() if n.startswith(f"kvm-{run}-")} == set()
