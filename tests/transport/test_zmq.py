"""kvmesh.transport.messaging: frame layout, zero-copy extra frames, CurveZMQ by
direction, the key files and `kvmesh keys generate`."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from kvmesh.protocol import MalformedMessage, Ping, decode
from kvmesh.transport.keys import Identity, KeyRing, generate, hash_key, plays
from kvmesh.transport.messaging import Sockets, send, split, user_of

pytestmark = pytest.mark.timeout(30)

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_endpoint(transport: str, directory: Path) -> str:
    return "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{directory}/t.sock"


def make_frames(*parts: bytes) -> list[zmq.Frame]:
    return [zmq.Frame(part) for part in parts]


# --- frame layout ---


@pytest.mark.parametrize(
    "kind, parts, expected",
    [
        (zmq.ROUTER, [b"id", b"body", b"x"], (b"id", b"body", [b"x"])),
        (zmq.DEALER, [b"body"], (None, b"body", [])),
        (zmq.DEALER, [b"body", b"x", b"y"], (None, b"body", [b"x", b"y"])),
        (zmq.SUB, [b"sender", b"body", b"x"], (b"sender", b"body", [b"x"])),
        (zmq.PULL, [b"sender", b"body"], (b"sender", b"body", [])),
    ],
)
def test_split_follows_the_socket_layout(kind, parts, expected):
    head, body, extra = split(kind, make_frames(*parts))
    assert (head, bytes(body), [frame.bytes for frame in extra]) == expected


@pytest.mark.parametrize(
    "kind, parts, text",
    [
        (zmq.ROUTER, [b"id"], "1 frame(s); a message on this socket has [head, body, *extra]"),
        (zmq.SUB, [b"sender"], "1 frame(s); a message on this socket has [head, body, *extra]"),
        (zmq.PULL, [b"sender"], "1 frame(s); a message on this socket has [head, body, *extra]"),
        (zmq.DEALER, [], "0 frame(s); a message on this socket has [body, *extra]"),
    ],
)
def test_split_refuses_too_few_frames(kind, parts, text):
    with pytest.raises(MalformedMessage) as caught:
        split(kind, make_frames(*parts))
    assert (caught.value.code, str(caught.value)) == ("malformed", text)


# --- sending ---


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_send_delivers_head_body_and_tracked_extra_frames(tmp_path, transport):
    payload = bytearray(random.Random(0).randbytes(1 << 20))

    async def scenario():
        sockets = Sockets(linger=0)
        try:
            pull, endpoint = sockets.open(zmq.PULL, make_endpoint(transport, tmp_path), bind=True)
            push, _ = sockets.open(zmq.PUSH, endpoint, bind=False)
            tracker = await send(
                push, Ping(call_id=3), head=b"me", frames=[payload, b"small"], track=True
            )
            frames = await pull.recv_multipart(copy=False)
            await asyncio.to_thread(tracker.wait, 5)  # raises zmq.NotDone if never released
            head, body, extra = split(zmq.PULL, frames)
            return head, decode(body), [frame.bytes for frame in extra]
        finally:
            sockets.close_all()

    assert asyncio.run(scenario()) == (b"me", Ping(call_id=3), [bytes(payload), b"small"])


def test_send_returns_a_tracker_only_when_asked(tmp_path):
    async def scenario():
        sockets = Sockets(linger=0)
        try:
            pull, endpoint = sockets.open(zmq.PULL, make_endpoint("ipc", tmp_path), bind=True)
            push, _ = sockets.open(zmq.PUSH, endpoint, bind=False)
            untracked = await send(push, Ping(), frames=[b"x"])
            tracked = await send(push, Ping(), frames=[b"x"], track=True)
            return untracked, type(tracked)
        finally:
            sockets.close_all()

    assert asyncio.run(scenario()) == (None, zmq.MessageTracker)


def test_open_names_the_endpoint_it_cannot_bind():
    async def scenario():
        sockets = Sockets(linger=0)
        try:
            _, endpoint = sockets.open(zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
            with pytest.raises(ValueError) as caught:
                sockets.open(zmq.ROUTER, endpoint, bind=True)
            return endpoint, str(caught.value)
        finally:
            sockets.close_all()

    endpoint, text = asyncio.run(scenario())
    assert text == f"cannot bind endpoint {endpoint!r}: Address already in use"


# --- CurveZMQ: one key per actor ---


def make_ring(
    directory: Path,
    own: str,
    identities=(("router-0", "router"), ("decode-0", "decode"), ("operator", "operator")),
) -> KeyRing:
    generate(directory, list(identities))
    return KeyRing(directory, own)


@pytest.mark.parametrize(
    "client_dir, pinned, delivered",
    [
        ("ring", "router-0", True),
        ("stranger", "router-0", False),  # ZAP refuses a key not in the ring
        (None, None, False),  # a plain client cannot talk to a CURVE server
        ("ring", "operator", False),  # pinned to another actor's key: no handshake
    ],
)
def test_curve_connects_only_ring_keys_to_the_actor_they_pin(
    tmp_path, client_dir, pinned, delivered
):
    server_ring = make_ring(tmp_path / "ring", "router-0")
    rings = {
        "ring": make_ring(tmp_path / "ring", "decode-0"),
        "stranger": make_ring(tmp_path / "stranger", "decode-0"),
    }

    async def scenario():
        server_side = Sockets(server_ring, linger=0)
        client_side = Sockets(rings.get(client_dir), linger=0)
        try:
            router, endpoint = server_side.open(zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
            dealer, _ = client_side.open(zmq.DEALER, endpoint, bind=False, server=pinned)
            await send(dealer, Ping(call_id=1))
            if not await router.poll(300 if not delivered else 5000):
                return False, None
            return True, user_of((await router.recv_multipart(copy=False))[0])
        finally:
            client_side.close_all()
            server_side.close_all()

    assert asyncio.run(scenario()) == ((True, "decode-0") if delivered else (False, None))


def test_connecting_with_keys_names_the_actor_it_reaches(tmp_path):
    ring = make_ring(tmp_path, "decode-0")

    async def scenario():
        sockets = Sockets(ring, linger=0)
        try:
            with pytest.raises(ValueError) as unnamed:
                sockets.open(zmq.DEALER, "tcp://127.0.0.1:9", bind=False)
            with pytest.raises(ValueError) as unknown:
                sockets.open(zmq.DEALER, "tcp://127.0.0.1:9", bind=False, server="decode-9")
            return str(unnamed.value), str(unknown.value)
        finally:
            sockets.close_all()

    assert asyncio.run(scenario()) == (
        "connecting to tcp://127.0.0.1:9 with keys needs the actor id it should reach, to "
        "pin its public key",
        f"security.key_dir {str(tmp_path)!r} has no decode-9.key: no key says who 'decode-9' is",
    )


def test_key_ring_needs_its_own_owner_only_secret(tmp_path):
    generate(tmp_path, [("decode-0", "decode")])
    with pytest.raises(ValueError) as missing:
        KeyRing(tmp_path, "decode-1")
    (tmp_path / "decode-0.key_secret").chmod(0o644)
    with pytest.raises(ValueError) as readable:
        KeyRing(tmp_path, "decode-0")

    assert str(missing.value) == (
        f"security.key_dir {str(tmp_path)!r} has no decode-1.key_secret: make the cluster's "
        "keys with `kvmesh keys generate DIR --config cluster.toml` and copy "
        "decode-1.key_secret to this node"
    )
    assert str(readable.value).startswith(
        f"{tmp_path}/decode-0.key_secret must be this user's and mode 600 (it is 644"
    )


def test_key_ring_refuses_a_directory_others_can_write(tmp_path):
    generate(tmp_path / "keys", [("decode-0", "decode")])
    (tmp_path / "keys").chmod(0o777)
    with pytest.raises(ValueError) as caught:
        KeyRing(tmp_path / "keys", "decode-0")
    assert str(caught.value) == (
        f"security.key_dir: {str(tmp_path / 'keys')!r} is writable by others (mode 777): "
        "anyone could add a key; chmod 700 it"
    )


def test_key_ring_reads_keys_added_later(tmp_path, monkeypatch):
    ring = make_ring(tmp_path, "decode-0")
    with pytest.raises(ValueError):
        ring.identity("decode-7")
    generate(tmp_path, [("decode-7", "decode")])
    monkeypatch.setattr(ring, "_loaded_at", ring._loaded_at - 2.0)  # its reread is due
    assert ring.identity("decode-7").role == "decode"


@pytest.mark.parametrize(
    "name, role, actor_id, claimed, admitted",
    [
        ("decode-0", "decode", "decode-0", "decode", True),
        ("decode-0", "decode", "decode-1", "decode", False),
        ("decode-0", "decode", "decode-0", "prefill", False),
        ("operator", "operator", "operator:123", "operator", True),
        ("operator", "operator", "operatorx", "operator", False),
        ("decode-0", "decode", "decode-0:1", "decode", False),
        ("decode-0", "worker", "decode-0", "decode", True),
        ("decode-0", "worker", "decode-0", "prefill", True),
        ("decode-0", "worker", "decode-1", "prefill", False),
        ("decode-0", "worker", "decode-0", "router", False),
        ("decode-0", "worker", "decode-0", "worker", False),
        ("planner-0", "planner", "planner-0", "planner", True),
    ],
)
def test_identity_admits_only_its_own_id_and_role(name, role, actor_id, claimed, admitted):
    assert Identity(name, role, b"x" * 40).admits(actor_id, claimed) is admitted


@pytest.mark.parametrize(
    "role, senders, may",
    [
        ("decode", frozenset({"decode"}), True),
        ("prefill", frozenset({"decode"}), False),
        ("worker", frozenset({"decode"}), True),
        ("worker", frozenset({"prefill", "decode"}), True),
        ("worker", frozenset({"frontend"}), False),
        ("worker", frozenset({"planner"}), False),
        (None, frozenset({"frontend"}), False),
    ],
)
def test_a_worker_key_plays_both_worker_roles_and_nothing_else(role, senders, may):
    assert plays(role, senders) is may


def test_generate_writes_a_keypair_per_name_owner_only_and_keeps_existing(tmp_path):
    directory = tmp_path / "keys"
    assert generate(directory, [("router-0", "router"), ("decode-0", "decode")]) == [
        "router-0",
        "decode-0",
    ]
    before = (directory / "decode-0.key").read_text()
    assert generate(directory, [("decode-0", "decode"), ("decode-1", "decode")]) == ["decode-1"]
    modes = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
    ring = KeyRing(directory, "decode-0")

    assert (directory.stat().st_mode & 0o777, (directory / "decode-0.key").read_text()) == (
        0o700,
        before,
    )
    assert modes == {f"{n}.key": 0o644 for n in ("router-0", "decode-0", "decode-1")} | {
        f"{n}.key_secret": 0o600 for n in ("router-0", "decode-0", "decode-1")
    } | {"cluster.hash_key": 0o600}
    assert zmq.curve_public(ring.secret) == ring.own.public
    assert generate(directory, [("decode-0", "decode")], force=True) == ["decode-0"]
    assert (directory / "decode-0.key").read_text() != before


def kvmesh_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_keys_generate_writes_every_actor_of_the_cluster_and_keeps_existing(tmp_path):
    directory = tmp_path / "keys"
    first = kvmesh_cli("keys", "generate", str(directory))
    again = kvmesh_cli("keys", "generate", str(directory), "--operator", "alice")

    actors = "frontend-0, router-0, prefill-0, decode-0, decode-1, cache-0"
    assert (first.returncode, first.stdout) == (
        0,
        f"wrote 7 keypair(s) into {directory}: {actors}, operator\n",
    )
    assert (again.returncode, again.stdout) == (
        0,
        f"wrote 1 keypair(s) into {directory}: alice\n"
        f"kept 7 existing: {actors}, operator (--force replaces them)\n",
    )
    names = {path.name.split(".")[0] for path in directory.iterdir()}
    assert names == {*actors.split(", "), "operator", "alice", "cluster"}  # cluster.hash_key
    assert len(hash_key(directory)) == 32


def test_cli_keys_generate_gives_a_planners_workers_worker_keys(tmp_path):
    directory = tmp_path / "keys"
    done = kvmesh_cli("keys", "generate", str(directory), "--set", "nodes.0.actors.4.role=planner")
    roles = {
        name: KeyRing(directory, name).own.role
        for name in ("frontend-0", "router-0", "prefill-0", "decode-0", "decode-1", "planner-0")
    }

    assert done.returncode == 0, done.stderr
    assert roles == {
        "frontend-0": "frontend",
        "router-0": "router",
        "prefill-0": "worker",
        "decode-0": "worker",
        "decode-1": "worker",
        "planner-0": "planner",
    }


def test_the_hash_key_is_the_directorys_or_one_per_user_made_once(tmp_path, monkeypatch):
    generate(tmp_path / "keys", [])
    keyed = hash_key(tmp_path / "keys")
    assert (tmp_path / "keys" / "cluster.hash_key").stat().st_mode & 0o777 == 0o600
    generate(tmp_path / "keys", [])  # kept
    assert hash_key(tmp_path / "keys") == keyed

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mine = hash_key(None)
    path = tmp_path / "cache" / "kvmesh" / "keys" / "hash_key"
    assert (hash_key(None), path.stat().st_mode & 0o777) == (mine, 0o600)
    assert mine != keyed and len(mine) == 32
    path.chmod(0o644)
    with pytest.raises(ValueError) as caught:
        hash_key(None)
    assert str(caught.value) == (
        f"{path} must be this user's regular file, mode 600 (it is 644, uid 0)".replace(
            "uid 0", f"uid {os.getuid()}"
        )
    )
