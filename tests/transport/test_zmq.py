"""kvmesh.transport.messaging: frame layout, zero-copy extra frames, CurveZMQ by
direction, the key files and `kvmesh keys generate`."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from kvmesh.protocol import MalformedMessage, Ping, decode
from kvmesh.transport.messaging import (
    KEY_NAME,
    CurveKeys,
    Sockets,
    generate_keys,
    send,
    split,
)

pytestmark = pytest.mark.timeout(30)

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_endpoint(transport: str, directory: Path) -> str:
    return "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{directory}/t.sock"


def make_keys(directory: Path) -> CurveKeys:
    generate_keys(directory)
    return CurveKeys.load(directory)


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


# --- CurveZMQ ---


@pytest.mark.parametrize(
    "server, client, delivered",
    [
        ("cluster", "cluster", True),
        ("cluster", "other", False),  # ZAP refuses a key not in the key directory
        ("cluster", None, False),  # a plain client cannot talk to a CURVE server
        ("other", "cluster", False),  # the client refuses a server without the cluster key
        (None, "cluster", False),
    ],
)
def test_curve_connects_only_holders_of_the_cluster_key(tmp_path, server, client, delivered):
    keys = {"cluster": make_keys(tmp_path / "cluster"), "other": make_keys(tmp_path / "other")}

    async def scenario():
        server_side = Sockets(keys.get(server), linger=0)
        client_side = Sockets(keys.get(client), linger=0)
        try:
            router, endpoint = server_side.open(zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
            dealer, _ = client_side.open(zmq.DEALER, endpoint, bind=False)
            await send(dealer, Ping(call_id=1))
            return bool(await router.poll(300))
        finally:
            client_side.close_all()
            server_side.close_all()

    assert asyncio.run(scenario()) == delivered


def test_curve_keys_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        CurveKeys.load(tmp_path)
    assert str(caught.value) == (
        f"key_dir {str(tmp_path)!r} has no cluster.key_secret; "
        "write one with `kvmesh keys generate DIR`"
    )


def test_generate_keys_writes_one_keypair_with_an_owner_only_secret(tmp_path):
    public, secret = generate_keys(tmp_path / "keys")

    assert (public.name, secret.name) == (f"{KEY_NAME}.key", f"{KEY_NAME}.key_secret")
    modes = [path.stat().st_mode & 0o777 for path in (tmp_path / "keys", public, secret)]
    assert modes == [0o700, 0o644, 0o600]
    public_key, no_secret = zmq.auth.load_certificate(public)
    keys = CurveKeys.load(tmp_path / "keys")
    assert (no_secret, keys.public) == (None, public_key)
    assert zmq.curve_public(keys.secret) == keys.public


def test_generate_keys_replaces_only_when_forced(tmp_path):
    generate_keys(tmp_path)
    before = CurveKeys.load(tmp_path)
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path)
    assert CurveKeys.load(tmp_path) == before
    generate_keys(tmp_path, force=True)
    assert CurveKeys.load(tmp_path).public != before.public


def kvmesh_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmesh", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_keys_generate_writes_the_files_and_refuses_to_overwrite(tmp_path):
    directory = tmp_path / "keys"
    first = kvmesh_cli("keys", "generate", str(directory))
    again = kvmesh_cli("keys", "generate", str(directory))

    assert (first.returncode, first.stdout) == (
        0,
        f"wrote {directory}/cluster.key (public) and {directory}/cluster.key_secret "
        "(secret, mode 600)\n",
    )
    assert sorted(path.name for path in directory.iterdir()) == [
        "cluster.key",
        "cluster.key_secret",
    ]
    assert (again.returncode, again.stderr) == (
        1,
        f"Error: {directory}/cluster.key_secret already exists; replacing it cuts off every "
        "actor holding the old keys; pass --force to replace it\n",
    )
