"""What `kvmesh up` says on a node of a many-node cluster while it waits (NodeMonitor):
the reasons, by what is missing after how long, when a node without the router stops,
and a node that cannot ask the router at all (no operator key). The real router is
asked in tests/cluster/test_two_nodes.py; here the monitor's answers are set by hand."""

from __future__ import annotations

import pytest

from kvmesh.cli.monitor import NodeMonitor
from kvmesh.config import load_config
from kvmesh.transport.keys import generate
from tests.polling import wait_until

TWO_NODES = (
    "[cluster]\nbase_port = 7000\n"
    '[[nodes]]\nname = "a"\naddress = "127.0.0.1"\n'
    '[[nodes.actors]]\nrole = "frontend"\n[[nodes.actors]]\nrole = "router"\n'
    '[[nodes.actors]]\nrole = "decode"\n'
    '[[nodes]]\nname = "b"\naddress = "127.0.0.2"\n'
    '[[nodes.actors]]\nrole = "decode"\n[[nodes.actors]]\nrole = "cache"\n'
)


def make_monitor(tmp_path, node: str = "b", extra: str = "") -> NodeMonitor:
    path = tmp_path / "cluster.toml"
    path.write_text(TWO_NODES + extra)
    return NodeMonitor(load_config(path), node)


def answered(monitor: NodeMonitor, at: float, *registered: str) -> NodeMonitor:
    monitor.first_answer_at = monitor.first_answer_at or at
    monitor.answered_at = at
    monitor.registered = frozenset(registered)
    return monitor


def test_a_silent_router_is_named_after_ten_seconds(tmp_path):
    monitor = make_monitor(tmp_path)
    monitor.error = "no Welcome from tcp://127.0.0.1:7002 within 2.0 s"
    assert monitor.reason(started=100.0, now=109.9) is None
    assert monitor.reason(started=100.0, now=110.0) == (
        "router-0 at tcp://127.0.0.1:7002 does not answer: no Welcome from "
        "tcp://127.0.0.1:7002 within 2.0 s; it runs on node a: is `kvmesh up --node a` "
        "running there, and does this host reach 127.0.0.1?"
    )
    assert not monitor.ready()


def test_actors_not_registered_are_named_by_node_after_the_router_answered(tmp_path):
    """Another node's after 30 s, this node's own (loading a model) after 90 s."""
    monitor = answered(make_monitor(tmp_path, "a"), 200.0, "router-0", "frontend-0")
    assert monitor.reason(started=100.0, now=229.9) is None
    assert monitor.reason(started=100.0, now=230.0) == (
        "not registered with router-0 yet: node b (127.0.0.2): decode-1, cache-0 (is "
        "`kvmesh up --node b` running there?)"
    )
    assert monitor.reason(started=100.0, now=290.0) == (
        "not registered with router-0 yet: this node's decode-0 (still starting?); node b "
        "(127.0.0.2): decode-1, cache-0 (is `kvmesh up --node b` running there?)"
    )
    assert not monitor.ready()
    answered(monitor, 231.0, "router-0", "frontend-0", "decode-0", "decode-1", "cache-0")
    assert monitor.reason(started=100.0, now=300.0) is None
    assert monitor.ready()


@pytest.mark.parametrize(
    ("node", "last_answer", "now", "stops"),
    [
        ("b", 100.0, 109.9, False),  # a router restart takes ~2 s
        ("b", 100.0, 110.0, True),
        ("b", None, 500.0, False),  # never answered: the start timeout decides
        ("a", 100.0, 500.0, False),  # the router's own node: its launcher restarts it
    ],
)
def test_a_node_without_the_router_stops_once_it_is_gone_ten_seconds(
    tmp_path, node, last_answer, now, stops
):
    monitor = make_monitor(tmp_path, node)
    if last_answer is not None:
        answered(monitor, last_answer, "router-0")
    lost = monitor.router_lost(now)
    assert (lost is not None) == stops
    if stops:
        assert lost.startswith("router-0 at tcp://127.0.0.1:7002 (node a) has not answered for")
        assert lost.endswith("the cluster stopped; stopping node b")


def test_a_node_without_the_operator_key_says_it_cannot_watch(tmp_path):
    keys = tmp_path / "keys"
    generate(keys, [("router-0", "router"), ("operator", "operator")])
    (keys / "operator.key_secret").unlink()
    monitor = make_monitor(tmp_path, extra=f'[security]\nkey_dir = "{keys}"\n')
    monitor.start()
    try:
        broken = wait_until(lambda: monitor.broken, "the monitor gives up", timeout=30)
    finally:
        monitor.stop()
    assert broken.startswith("cannot ask router-0 for the cluster's state: ")
    assert "operator" in broken
