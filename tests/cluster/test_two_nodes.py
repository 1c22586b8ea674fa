"""Two nodes on one host, as a user first tries many hosts: node a at 127.0.0.1 (frontend,
router, decode, cache) and node b at 127.0.0.2 (decode, cache), each its own
`kvmesh up --node NAME` process with the default cluster.host (loopback).

Each node listens on its own address from the address book; a node started alone says
why it is not ready (its router does not answer, naming the address) long before any
timeout, and that it is up once its actors have registered; `--once` on node a stops the
cluster: node b notices its router gone and stops too, and no actor process or shared
memory segment of either node is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.bench.cluster import free_port_range
from tests.cluster.nodes import alive, listening, segments_of, spawned_pids
from tests.polling import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(400)]

# address book: a: frontend-0, router-0, decode-0, cache-0; b: decode-1, cache-1
NODES = {"a": "127.0.0.1", "b": "127.0.0.2"}
INDEX = {"frontend-0": 0, "router-0": 1, "decode-0": 2, "cache-0": 3, "decode-1": 4, "cache-1": 5}


def write_two_nodes(tmp_path: Path, model_dir: Path, base: int, host: str = "127.0.0.1") -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(
        f'[cluster]\nhost = "{host}"\nbase_port = {base}\n'
        f'[model]\npath = "{model_dir}"\n'
        f"[kv]\ndevice_blocks = 256\nhost_gb = 0.02\n"
        f"[frontend]\nhttp_port = {base + 30}\n"
        '[[nodes]]\nname = "a"\naddress = "127.0.0.1"\n'
        '[[nodes.actors]]\nrole = "frontend"\n[[nodes.actors]]\nrole = "router"\n'
        '[[nodes.actors]]\nrole = "decode"\n[[nodes.actors]]\nrole = "cache"\n'
        '[[nodes]]\nname = "b"\naddress = "127.0.0.2"\n'
        '[[nodes.actors]]\nrole = "decode"\n[[nodes.actors]]\nrole = "cache"\n'
    )
    return path


class Node:
    """One `kvmesh up --node NAME`, its stdout and stderr in files."""

    def __init__(self, tmp_path: Path, config: Path, name: str, *args: str) -> None:
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        self.log = tmp_path / f"{name}.log"
        command = [sys.executable, "-m", "kvmesh", "--log-file", str(self.log), "up"]
        command += ["--config", str(config), "--node", name, "--timeout", "240", *args]
        self.process = subprocess.Popen(
            command, stdout=self.out.open("w"), stderr=self.err.open("w")
        )

    def said(self, text: str) -> bool:
        return text in self.out.read_text() + self.err.read_text()

    def wait_said(self, text: str, timeout: float = 120) -> None:
        def check():
            if self.process.poll() is not None and not self.said(text):
                pytest.fail(f"exited {self.process.returncode} first:\n{self.output()}")
            return self.said(text)

        wait_until(check, f"{self.out.stem} says {text!r}", timeout)

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()}\nstderr:\n{self.err.read_text()[-4000:]}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def test_two_nodes_listen_on_their_addresses_and_stop_together(tmp_path, tiny_model_dir):
    base = free_port_range(32)
    config = write_two_nodes(tmp_path, tiny_model_dir, base)
    router = f"tcp://127.0.0.1:{base + 2 * INDEX['router-0']}"
    b = Node(tmp_path, config, "b")
    a = None
    try:
        # alone, b says why it is not ready, naming the router's address, within seconds
        b.wait_said(f"waiting: router-0 at {router} does not answer", timeout=60)
        assert b.said("it runs on node a: is `kvmesh up --node a` running there")
        for actor in ("decode-1", "cache-1"):  # on b's address only: its ROUTER and PUB
            for port in (base + 2 * INDEX[actor], base + 2 * INDEX[actor] + 1):
                assert wait_until(lambda p=port: listening(p), f"{actor} listens on {port}") == {
                    "127.0.0.2"
                }
        a = Node(tmp_path, config, "a", "--ask", "hi", "--once")
        assert a.process.wait(timeout=240) == 0, a.output()
        assert a.said(f"kvmesh is up: http://127.0.0.1:{base + 30}/v1"), a.output()
        assert a.said("kvmesh> "), a.output()
        assert b.process.wait(timeout=90) == 0, b.output()
    finally:
        for node in (a, b):
            if node is not None:
                node.stop()
    assert b.said(
        f"node b is up: cache-1, decode-1 registered with router-0 at {router}; "
        f"the frontend: http://127.0.0.1:{base + 30}/v1"
    ), b.output()
    assert b.said(f"router-0 at {router} (node a) has not answered for 10 s"), b.output()
    assert b.said("stopping node b"), b.output()
    # b's decode worker reached b's own cache actor
    assert any(
        "cache_attached" in line and "actor=decode-1" in line
        for line in b.log.read_text().splitlines()
    ), b.log.read_text()[-3000:]
    for node in (a, b):  # a Goodbye from the router stops b's connections cleanly
        assert "[warning" not in node.err.read_text(), node.output()
        assert "Traceback" not in node.err.read_text(), node.output()
    pids = list(spawned_pids(a.log).values()) + list(spawned_pids(b.log).values())
    assert len(pids) == 6
    assert [pid for pid in pids if alive(pid)] == []
    assert segments_of(pids) == []


def test_a_node_whose_address_this_host_lacks_is_refused_before_it_starts(tmp_path, tiny_model_dir):
    # 192.0.2.1: TEST-NET-1, no host's address; a specific cluster.host, so each node
    # binds its own address
    config = write_two_nodes(tmp_path, tiny_model_dir, free_port_range(32), host="192.0.2.1")
    text = config.read_text().replace("127.0.0.2", "192.0.2.1")
    config.write_text(text + "[security]\ninsecure = true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvmesh", "up", "--config", str(config), "--node", "b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "Error: nodes.1.address: node b's actors listen on 192.0.2.1, which this host cannot "
        "bind (Cannot assign requested address); expected `kvmesh up --node NAME` with the "
        'node whose address this host has, or cluster.host = "0.0.0.0" (every interface; '
        "peers are told the node's address)"
    )
