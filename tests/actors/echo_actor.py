"""An actor the tests run in a real process, and the handle they drive it by.

`python -m tests.actors.echo_actor --transport tcp|ipc --dir DIR [...]` binds

    from_peers  ROUTER   answers Ping (after --ping-delay s), echoing the extra frames
    events_in   SUB   -> events_out  PUB    relays every BlockStored, frames included
    jobs_in     PULL  -> jobs_out    PUSH   relays every BlockStored, frames included

and with --connect ENDPOINT also dials a DEALER `to_server` there. On stdout it prints
one JSON line of its endpoints once serving, then event lines: `ping_started`,
`draining`, `peer_dead <id>`. Logs go to stderr.
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
import time
from pathlib import Path

import zmq

from kvmesh import log
from kvmesh.actors.base import Actor, ActorConfig, Inbound, any_peer
from kvmesh.protocol import BlockStored, Ping, Pong

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAY = {"events_in": "events_out", "jobs_in": "jobs_out"}
SOCKETS = [  # name, kind; all bound
    ("from_peers", zmq.ROUTER),
    ("events_in", zmq.SUB),
    ("events_out", zmq.PUB),
    ("jobs_in", zmq.PULL),
    ("jobs_out", zmq.PUSH),
]


def endpoint_for(transport: str, directory: Path, name: str) -> str:
    """tcp: an ephemeral port on loopback; ipc: a socket file in directory."""
    return "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{directory}/{name}.sock"


def say(line: str) -> None:
    print(line, flush=True)


class EchoActor(Actor):
    """Answers Ping, relays BlockStored, reports its life on stdout."""

    role = "echo"
    senders = {}  # the runtime alone is tested here: no role may send only some messages

    def __init__(self, config: ActorConfig, args: argparse.Namespace) -> None:
        self.role = args.role  # with keys, the role its key names
        super().__init__(config)
        self.args = args
        self.watch(any_peer, self.peer_died)

    async def setup(self) -> None:
        for name, kind in SOCKETS:
            self.open(name, kind, endpoint_for(self.args.transport, self.args.dir, name), bind=True)
        say(json.dumps(self.endpoints))  # before connect: the test answers its Hello
        if self.args.connect:
            await self.connect("to_server", self.args.connect, timeout=10)

    async def on_ping(self, msg: Ping, inbound: Inbound) -> tuple[Pong, list]:
        """Answer after --ping-delay seconds, echoing the extra frames."""
        if self.args.ping_delay:
            say("ping_started")
            await asyncio.sleep(self.args.ping_delay)
        return Pong(), inbound.frames

    async def on_block_stored(self, msg: BlockStored, inbound: Inbound) -> None:
        """Relay SUB -> PUB and PULL -> PUSH."""
        await self.emit(RELAY[inbound.socket], msg, frames=inbound.frames)

    async def drain(self) -> None:
        say("draining")

    async def peer_died(self, peer_id: str) -> None:
        say(f"peer_dead {peer_id}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", default="echo")
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--key-dir", type=Path)
    parser.add_argument("--role", default="echo")
    parser.add_argument("--connect")
    parser.add_argument("--ping-delay", type=float, default=0.0)
    parser.add_argument("--max-size", type=int, default=65536)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--liveness", type=int, default=10)
    parser.add_argument("--max-handlers", type=int, default=4096)
    parser.add_argument("--max-frame", type=int, default=4 << 20)  # extra frames: 1 MiB
    args = parser.parse_args()
    log.configure("info")
    config = ActorConfig(
        actor_id=args.id,
        heartbeat_interval=args.heartbeat,
        liveness=args.liveness,
        max_message_size=args.max_size,
        max_handlers=args.max_handlers,
        max_frame_size=args.max_frame,
        grace_period=5.0,
        linger=1.0,
        key_dir=args.key_dir,
    )
    sys.exit(EchoActor(config, args).run())


# --- the test side ---


class EchoProcess:
    """A running echo actor: its endpoints, its stdout lines, its exit."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.stderr_path = directory / "echo.stderr"
        with open(self.stderr_path, "wb") as stderr:  # a file: a full pipe would block it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.actors.echo_actor", "--dir", str(directory), *args],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )
        self._buffer = b""
        self.endpoints: dict[str, str] = {}

    def start(self, timeout: float = 20.0) -> EchoProcess:
        self.endpoints = json.loads(self.read_line(timeout))
        return self

    def __enter__(self) -> EchoProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_line(self, timeout: float = 10.0) -> str:
        """The next stdout line; raises TimeoutError, or RuntimeError if it exited."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line from the echo actor in {timeout} s; {self.stderr()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"echo actor exited {self.proc.wait()}: {self.stderr()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def expect_line(self, expected: str, timeout: float = 10.0) -> None:
        line = self.read_line(timeout)
        assert line == expected, f"expected {expected!r} from the echo actor, got {line!r}"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc.stdout.close()


if __name__ == "__main__":
    main()
