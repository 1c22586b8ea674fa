"""A KV data plane actor the tests run in a real process, the pools both sides fill, and
the handle the tests drive the process by.

`python -m tests.transport.peer --dtype float32 --num-blocks 16 [...]` binds a ROUTER
`from_peers` on tcp://127.0.0.1 with its pool in shared memory (filled by
make_pool(seed=--seed)), prints one JSON line {"event": "ready", "endpoint", "shm"},
then runs the JSON commands it reads on stdin, each in its own task, answering on stdout:

    {"op": "write", "to", "id", "src", "dst", "pause_after"?, "backend"?}
        -> {"event": "written", "id", "backend"} | {"event": "error", "id", "type", "message"}
        backend (default "auto") is the sending plane's setting
        pause_after=k: writes layer by layer, prints {"event": "paused", "id"} after k
        layers and waits for {"op": "resume", "id"}
    {"op": "dump", "path"}         -> the pool's bytes in path, then {"event": "dumped"}
    {"op": "exit"}                 -> closes (segment unlinked) and exits 0

--stall-receive makes every KvWrite handler hang (a receiver that dies mid-transfer).
UCX may print on stdout too: the test side reads only lines that start with "{".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import zmq

from kvmesh import log
from kvmesh.actors.base import Actor, ActorConfig, any_peer
from kvmesh.transport.dataplane import DataPlaneHandlers, KVDataPlane, allocate_shared_pool
from kvmesh.transport.kv_layout import DTYPES, KVLayout

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small, but every dimension distinct: a transposed index shows up as wrong bytes.
NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 4, 2, 8


def make_layout(dtype: torch.dtype, num_blocks: int) -> KVLayout:
    return KVLayout(NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype)


def fill_pool(kv_caches: list[torch.Tensor], seed: int) -> None:
    """Seeded values in every layer: the same on every process for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    for cache in kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))


def make_cuda_pool(layout: KVLayout, device: str) -> list[torch.Tensor]:
    """One allocation on the GPU, handed out per layer."""
    shape = (
        layout.num_layers,
        2,
        layout.num_blocks,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    return list(torch.zeros(shape, dtype=layout.dtype, device=device).unbind(0))


def say(**event) -> None:
    print(json.dumps(event), flush=True)


class StallingHandlers(DataPlaneHandlers):
    """--stall-receive: a KvWrite that never finishes landing."""

    async def on_kv_write(self, msg, inbound):
        say(event="stalled", id=msg.transfer_id)
        await asyncio.Event().wait()


class PeerActor(Actor):
    """A pool in shared memory, its data plane, and the test's commands."""

    role = "prefill"

    def __init__(self, config: ActorConfig, args: argparse.Namespace) -> None:
        super().__init__(config)
        self.args = args
        layout = make_layout(DTYPES[args.dtype], args.num_blocks)
        if args.device == "cpu":
            self.kv_caches, segment = allocate_shared_pool(layout, config.actor_id)
        else:  # a CUDA pool: same-host writes go by CUDA IPC
            self.kv_caches, segment = make_cuda_pool(layout, args.device), None
        fill_pool(self.kv_caches, args.seed)
        # the tests write here to check bytes; grants are tested with Side as receiver
        self.kv_plane = KVDataPlane(self, self.kv_caches, segment=segment, require_grants=False)
        handlers = StallingHandlers if args.stall_receive else DataPlaneHandlers
        handlers(self.kv_plane).register(self)
        self.senders = {"auto": self.kv_plane}  # a write may force a backend
        self.resume: dict[str, asyncio.Event] = {}
        self.watch(any_peer, self._fail_senders)

    def sender(self, backend: str) -> KVDataPlane:
        if backend not in self.senders:
            self.senders[backend] = KVDataPlane(self, self.kv_caches, backend=backend)
        return self.senders[backend]

    async def _fail_senders(self, peer_id: str) -> None:
        for plane in self.senders.values():
            if plane is not self.kv_plane:
                plane.peer_dead(peer_id)

    async def setup(self) -> None:
        endpoint = self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
        segment = self.kv_plane.segment
        say(event="ready", endpoint=endpoint, shm=segment and segment.name, pid=os.getpid())
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_stdin, args=(loop,), daemon=True).start()

    def _read_stdin(self, loop: asyncio.AbstractEventLoop) -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(self.supervise, "command", self._command, json.loads(line))

    async def _command(self, cmd: dict) -> None:
        op = cmd["op"]
        try:
            if op == "write":
                plane = self.sender(cmd.get("backend", "auto"))
                await self._write(plane, cmd)
                link, _ = await plane.link(cmd["to"])
                say(event="written", id=cmd["id"], backend=link.backend)
            elif op == "resume":
                self.resume[cmd["id"]].set()
            elif op == "dump":
                with open(cmd["path"], "wb") as out:
                    for cache in self.kv_caches:
                        out.write(cache.cpu().view(-1).view(torch.uint8).numpy().tobytes())
                say(event="dumped")
            elif op == "exit":
                self.stop()
        except Exception as exc:
            say(event="error", id=cmd.get("id"), type=type(exc).__name__, message=str(exc))

    async def _write(self, plane: KVDataPlane, cmd: dict) -> None:
        pause_after = cmd.get("pause_after")
        if pause_after is None:
            await plane.write(cmd["to"], cmd["id"], cmd["src"], cmd["dst"])
            return
        for layer in range(NUM_LAYERS):
            if layer == pause_after:
                resume = self.resume[cmd["id"]] = asyncio.Event()
                say(event="paused", id=cmd["id"])
                await resume.wait()
                del self.resume[cmd["id"]]
            await plane.write(
                cmd["to"], cmd["id"], cmd["src"], cmd["dst"], layers=range(layer, layer + 1)
            )

    async def close(self) -> None:
        await super().close()
        for plane in self.senders.values():
            await plane.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", default="peer")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--liveness", type=int, default=5)
    parser.add_argument("--stall-receive", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    log.configure("info")
    config = ActorConfig(
        actor_id=args.id,
        heartbeat_interval=args.heartbeat,
        liveness=args.liveness,
        grace_period=2.0,
        linger=0.5,
    )
    sys.exit(PeerActor(config, args).run())


# --- the test side ---


class PeerProcess:
    """A running peer: its ready line, its JSON events, its exit."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.stderr_path = directory / f"peer-{time.monotonic_ns()}.stderr"
        with open(self.stderr_path, "wb") as stderr:  # a file: a full pipe would block it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.transport.peer", *args],
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )
        self._buffer = b""
        self.ready: dict = {}

    def start(self, timeout: float = 30.0) -> PeerProcess:
        self.ready = self.expect("ready", timeout)
        return self

    def __enter__(self) -> PeerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def command(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 10.0) -> dict:
        """The next JSON event; it must be `event` (an error event fails with its text)."""
        got = self.read_event(timeout)
        assert got["event"] == event, (
            f"expected {event!r} from the peer, got {got}; {self.stderr()}"
        )
        return got

    def read_event(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event from the peer in {timeout} s; {self.stderr()}")
                if select.select([fd], [], [], left)[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise RuntimeError(f"peer exited {self.proc.wait()}: {self.stderr()}")
                    self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.startswith(b"{"):
                return json.loads(line)

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


if __name__ == "__main__":
    main()
