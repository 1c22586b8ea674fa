"""kvmesh on three hosts in network namespaces (tests/multihost/netns.py), as on three
machines: router and frontend on host a, a prefill worker on b, a decode worker and a
cache actor on c, each host its own `kvmesh up --config X --node NAME` listening on its
own address with CurveZMQ keys. The official openai client on host a talks to the
frontend's address; outputs equal the in-process Engine's, a long prompt is prefilled on
b and its KV crosses to c over the ZeroMQ data plane (each host has its own /dev/shm,
so shared memory cannot carry it)."""

from __future__ import annotations

import re

import pytest

from kvmesh import SamplingParams
from kvmesh.bench.cluster import free_port_range
from tests.multihost.nodes import Node, ask, write_config
from tests.prompts import random_prompt

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ROLES = {"a": ["frontend", "router"], "b": ["prefill"], "c": ["decode", "cache"]}


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory, tiny_model_dir):
    """The three nodes, up; stopped (and checked to stop cleanly) after the module."""
    tmp = tmp_path_factory.mktemp("netns-cluster")
    base = free_port_range(40)
    config = write_config(tmp / "cluster.toml", hosts, tiny_model_dir, base, ROLES)
    nodes = {}
    try:
        for name in ("c", "b", "a"):
            nodes[name] = Node(hosts, tmp, config, name)
        url = f"http://{hosts.host('a').address}:{base + 30}/v1"
        nodes["a"].wait_said(f"kvmesh is up: {url}")
        yield nodes, url
    finally:
        codes = {name: node.stop() for name, node in nodes.items()}
    assert codes == {"c": 0, "b": 0, "a": 0}, {n: node.output() for n, node in nodes.items()}


def test_three_hosts_serve_engine_outputs_with_kv_across_hosts(
    hosts, cluster, engine, tiny_model_dir
):
    nodes, url = cluster
    prompts = [random_prompt(30, seed=1), random_prompt(300, seed=2)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [out.text for out in engine.generate(prompts, greedy)]
    job = {
        "url": url,
        "model": tiny_model_dir.name,
        "requests": [
            {"id": i, "prompt": prompt, "max_tokens": 24, "stream": i == 1}
            for i, prompt in enumerate(prompts)
        ],
    }
    got = ask(hosts, "a", job)
    assert [r.get("text", r.get("error")) for r in got] == want
    # the 300-token prompt went to b's prefill worker, which wrote its KV into c's
    # decode worker over ZeroMQ: no shared memory between hosts
    log_b = nodes["b"].log.read_text()
    assert re.search(
        r"kv_link\s.*backend=zmq.*peer=decode-0|kv_link\s.*peer=decode-0.*backend=zmq", log_b
    ), log_b[-3000:]
    assert "backend=shm" not in log_b
