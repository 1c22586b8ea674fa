"""A cluster with per-actor CurveZMQ keys: it serves; a peer without a key gets nothing;
a key of the ring cannot pose as another actor or do what its role may not; and a
cluster whose actor sockets leave loopback needs keys (or says loudly that it has none)."""

import json
import signal
import subprocess
import sys

import httpx
import pytest
import zmq

from kvmesh.bench.cluster import DISAGGREGATED, free_port_range, start_cluster
from kvmesh.protocol import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    RegisterWorker,
    Welcome,
    decode,
    encode,
)
from kvmesh.transport.keys import KeyRing

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory, tiny_model_dir):
    keys = tmp_path_factory.mktemp("keys") / "k"
    subprocess.run(
        [sys.executable, "-m", "kvmesh", "keys", "generate", str(keys)],
        check=True,
        capture_output=True,
    )
    c = start_cluster(
        tmp_path_factory.mktemp("secure"),
        tiny_model_dir,
        *DISAGGREGATED,
        f"security.key_dir={keys}",
    )
    c.keys = keys
    yield c
    assert c.stop() == 0


def router_endpoint(c) -> str:
    rows = json.loads(c.kvmesh("status", "--json").stdout)
    return next(r for r in rows if r["role"] == "router")["endpoints"]["from_peers"]


def dealer(context: zmq.Context, endpoint: str, ring: KeyRing | None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if ring is not None:  # a CURVE client holding ring.own's key, pinned to router-0
        sock.curve_publickey, sock.curve_secretkey = ring.own.public, ring.secret
        sock.curve_serverkey = ring.identity("router-0").public
    sock.connect(endpoint)
    return sock


def answer(sock: zmq.Socket, timeout: float = 10.0):
    while sock.poll(timeout * 1000):
        msg = decode(sock.recv())
        if not isinstance(msg, Heartbeat):
            return msg
    raise TimeoutError("no answer")


def completion(c) -> int:
    name = httpx.get(f"{c.url}/v1/models").json()["data"][0]["id"]
    return httpx.post(
        f"{c.url}/v1/completions",
        timeout=60,
        json={"model": name, "prompt": "hello", "max_tokens": 4},
    ).status_code


def test_secured_cluster_serves_and_ignores_keyless_peers(secure_cluster):
    c = secure_cluster
    assert completion(c) == 200
    rows = json.loads(c.kvmesh("status", "--json").stdout)  # `kvmesh status`: operator's key
    assert sorted(r["actor"] for r in rows) == [
        "cache-0",
        "decode-0",
        "decode-1",
        "frontend-0",
        "prefill-0",
        "router-0",
    ]
    context = zmq.Context()
    sock = dealer(context, router_endpoint(c), None)
    sock.send(
        encode(
            Hello(
                version=PROTOCOL_VERSION,
                call_id=1,
                actor_id="intruder",
                role="decode",
                node="x",
                endpoints={},
            )
        )
    )
    assert sock.poll(1500) == 0  # no Welcome, no Error: nothing at all
    context.destroy()
    assert "intruder" not in c.kvmesh("status", "--json").stdout


def test_a_ring_key_cannot_pose_as_a_worker(secure_cluster):
    """The operator's key (a real key of the ring) says Hello as decode-0, to take its
    prompts or have the live decode-0 declared dead: refused, and decode-0 serves on."""
    c = secure_cluster
    before = c.status()["decode-0"]["pid"]
    context = zmq.Context()
    sock = dealer(context, router_endpoint(c), KeyRing(c.keys, "operator"))
    sock.send(
        encode(
            Hello(
                version=PROTOCOL_VERSION,
                call_id=1,
                actor_id="decode-0",
                role="decode",
                node="x",
                endpoints={},
            )
        )
    )
    reply = answer(sock)
    context.destroy()

    assert reply == Error(
        code=ErrorCode.FORBIDDEN,
        in_reply_to=1,
        message=("key 'operator' (operator) may not say Hello as decode 'decode-0'"),
    )
    assert c.status()["decode-0"]["pid"] == before
    assert completion(c) == 200


def test_an_operator_may_not_register_as_a_worker(secure_cluster):
    c = secure_cluster
    context = zmq.Context()
    sock = dealer(context, router_endpoint(c), KeyRing(c.keys, "operator"))
    sock.send(
        encode(
            Hello(
                version=PROTOCOL_VERSION,
                call_id=1,
                actor_id="operator:7",
                role="operator",
                node="x",
                endpoints={},
            )
        )
    )
    welcome = answer(sock)
    sock.send(
        encode(
            RegisterWorker(
                call_id=2,
                model="m",
                block_size=16,
                num_blocks=8,
                max_num_seqs=1,
                events_endpoint="tcp://127.0.0.1:9",
            )
        )
    )
    refusal = answer(sock)
    context.destroy()

    assert type(welcome) is Welcome
    assert (refusal.code, refusal.in_reply_to) == (ErrorCode.FORBIDDEN, 2)
    assert refusal.message == (
        "RegisterWorker may come from decode, prefill, not from operator:7 (role operator)"
    )
    assert "operator:7" not in c.kvmesh("status", "--json").stdout


def run_router(tmp_path, *overrides: str) -> subprocess.Popen:
    base = free_port_range(12)
    args = [f"cluster.base_port={base}", "cluster.host=0.0.0.0", *overrides]
    command = [sys.executable, "-m", "kvmesh", "actor", "router-0"]
    for override in args:
        command += ["--set", override]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def test_actor_sockets_beyond_loopback_need_keys_or_an_explicit_insecure(tmp_path):
    refused = run_router(tmp_path)
    _, refused_err = refused.communicate(timeout=60)
    insecure = run_router(tmp_path, "security.insecure=true")
    warned = ""
    for line in insecure.stderr:
        warned += line
        if "actor_started" in line:
            break
    insecure.send_signal(signal.SIGTERM)
    insecure.communicate(timeout=30)

    assert refused.returncode == 2
    assert (
        'security.key_dir: cluster.host = "0.0.0.0" opens the actor sockets to other hosts'
    ) in refused_err
    assert "insecure" in warned and "anyone reaching them can join the cluster" in warned
    assert insecure.returncode == 0
