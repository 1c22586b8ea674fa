"""kvmesh on three hosts in network namespaces (tests/multihost/netns.py), as on three
machines: router and frontend on host a, a prefill worker on b, a decode worker and a
cache actor on c, each host its own `kvmesh up --config X --node NAME` listening on its
own address with CurveZMQ keys. The official openai client on host a talks to the
frontend's address; outputs equal the in-process Engine's, a long prompt is prefilled on
b and its KV crosses to c over the ZeroMQ data plane (each host has its own /dev/shm,
so shared memory cannot carry it).

Faults between hosts: with b's and c's links degraded (tc netem delay and loss where the
kernel has netem, tbf rate limiting) outputs stay equal; with c's cable out of the switch
during two streams, both fail with the reason (no decode worker left to migrate to)
within seconds, none hangs, and once it is back a later request is served."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kvmesh import SamplingParams
from kvmesh.bench.cluster import free_port_range
from tests.multihost.netns import QdiscUnknown
from tests.multihost.nodes import CLIENT, Node, ask, pythonpath, write_config
from tests.polling import wait_until
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


@pytest.mark.slow  # about 35 s a qdisc: -m slow
@pytest.mark.parametrize(
    "qdisc",
    ["netem delay 20ms loss 1%", "tbf rate 20mbit burst 32kbit latency 100ms"],
    ids=["netem", "tbf"],
)
def test_a_degraded_link_still_gives_engine_outputs(hosts, cluster, engine, tiny_model_dir, qdisc):
    nodes, url = cluster
    prompts = [random_prompt(200, seed=3), random_prompt(40, seed=4)]
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    want = [out.text for out in engine.generate(prompts, greedy)]
    job = {
        "url": url,
        "model": tiny_model_dir.name,
        "requests": [
            {"id": i, "prompt": p, "max_tokens": 32, "stream": True} for i, p in enumerate(prompts)
        ],
    }
    try:  # b sends the KV, c every token
        for name in ("b", "c"):
            hosts.shape(name, qdisc)
    except QdiscUnknown as exc:  # a kernel module (sch_netem), not a tool CI can install
        hosts.shape("b", None)
        pytest.skip(str(exc))
    try:
        got = ask(hosts, "a", job)
    finally:
        for name in ("b", "c"):
            hosts.shape(name, None)
    assert [r.get("text", r.get("error")) for r in got] == want


def test_a_link_down_fails_streams_clearly_and_the_cluster_recovers(
    hosts, cluster, engine, tiny_model_dir, tmp_path
):
    nodes, url = cluster
    prompts = [random_prompt(40, seed=5), random_prompt(60, seed=6)]
    job = {
        "url": url,
        "model": tiny_model_dir.name,
        "parallel": True,
        "timeout": 60,
        "requests": [
            {"id": i, "prompt": p, "max_tokens": 2000, "stream": True}
            for i, p in enumerate(prompts)
        ],
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    client = subprocess.Popen(
        hosts.argv("a", [sys.executable, str(CLIENT)]),
        stdin=(tmp_path / "job.json").open(),
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": pythonpath()},
    )
    started = [json.loads(client.stdout.readline()) for _ in prompts]
    assert sorted(line["started"] for line in started) == [0, 1]
    hosts.link("c", up=False)  # the decode host's cable out, streams in flight
    try:
        out, _ = client.communicate(timeout=120)  # none hangs
    finally:
        hosts.link("c", up=True)
    results = [json.loads(line) for line in out.splitlines()]
    # the only decode worker is gone: each stream moved on (the frontend tried to migrate
    # it) and failed with the reason, after the tokens it had, long before any timeout
    assert [(r["id"], r["error"]) for r in results] == [
        (i, "APIError: no placement: no alive decode worker") for i in (0, 1)
    ], results
    assert all(r["chunks"] > 0 for r in results), results
    assert nodes["a"].err.read_text().count("request_migrating") >= 2, nodes["a"].output()
    # the link is back (within 10 s, before node c gives its router up): c's actors
    # register again and a later request gets the Engine's output
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = engine.generate([prompts[0]], greedy)[0].text
    short = {"url": url, "model": tiny_model_dir.name}
    short["requests"] = [{"id": 0, "prompt": prompts[0], "max_tokens": 8}]

    def answered():
        result = ask(hosts, "a", short)[0]
        assert result.get("error", "APIError: no placement: no alive decode worker") == (
            "APIError: no placement: no alive decode worker"
        ), result
        return result.get("text")

    assert wait_until(answered, "a request after the link is back", timeout=60) == want
    assert nodes["c"].process.poll() is None, nodes["c"].output()
