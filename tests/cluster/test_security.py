"""A cluster with CurveZMQ keys: it serves, and a peer without the key gets nothing."""

import json
import subprocess
import sys

import httpx
import pytest
import zmq

from kvmesh.bench.cluster import start_cluster
from kvmesh.protocol import PROTOCOL_VERSION, Hello, encode


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory, tiny_model_dir):
    keys = tmp_path_factory.mktemp("keys") / "k"
    subprocess.run([sys.executable, "-m", "kvmesh", "keys", "generate", str(keys)], check=True,
                   capture_output=True)
    c = start_cluster(tmp_path_factory.mktemp("secure"), tiny_model_dir,
                      f"security.key_dir={keys}")
    yield c
    assert c.stop() == 0


def test_secured_cluster_serves_and_ignores_keyless_peers(secure_cluster):
    c = secure_cluster
    name = httpx.get(f"{c.url}/v1/models").json()["data"][0]["id"]
    reply = httpx.post(f"{c.url}/v1/completions",
                       json={"model": name, "prompt": "hello", "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200
    rows = json.loads(c.kvmesh("status", "--json").stdout)
    router = next(r for r in rows if r["role"] == "router")["endpoints"]["from_peers"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(router)
    sock.send(encode(Hello(version=PROTOCOL_VERSION, call_id=1, actor_id="intruder",
                           role="client", node="x", endpoints={})))
    assert sock.poll(1500) == 0  # no Welcome, no Error: nothing at all
    sock.close()
    ctx.term()
    assert "intruder" not in c.kvmesh("status", "--json").stdout
