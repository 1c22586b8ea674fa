"""`kvmesh bench transfer`: KV blocks between two real processes on each data plane
backend, against baselines measured in the same run.

Geometry: Llama-3-8B's KV (32 layers, block_size 16, 8 KV heads, head_dim 128, bfloat16:
2 MiB per block across the layers). A receiver process holds a pool of the largest size
in shared memory; this process holds a pool of the same layout, one tensor per layer.
For each size, a transfer writes size / 2 MiB random source blocks into random distinct
destination blocks and returns once the receiver answered KvWriteDone (every chunk in
place). GB/s are 1e9 bytes per second.

Rounds, for a noisy machine: after one untimed round (links, pages, numba), each of
`repeats` rounds runs every measurement once, back to back, and each figure is its best
round. So a burst of load from elsewhere hits the baselines as much as the transfers.
  memcpy_gbps   np.copyto of the same number of bytes in this process (one thread)
  zmq_raw_gbps  the same bytes as one copy=False frame over a bare ZeroMQ DEALER ->
                ROUTER tcp loopback to the receiver process, answered with one byte
  transfer_gbps {"shm", "zmq", "ucx"}: kvmesh writes (ucx: null without ucxx)
Then kvmesh.bench.pack.measure_pack gives pack_gbps / unpack_gbps with its own memcpy
baseline, pack_memcpy_gbps (same call). Ratios printed: shm / memcpy (target >= 0.8),
numba pack / pack_memcpy (target >= 0.7), zmq / raw zmq (target >= 0.8).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import click

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 32, 16, 8, 128
BLOCK_BYTES = 2 * LAYERS * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2  # bfloat16, all layers
TARGETS = {"shm": 0.8, "numba": 0.7, "zmq": 0.8}


@click.command("transfer")
@click.option(
    "--sizes",
    default="64,512",
    show_default=True,
    help="Comma-separated sizes in MiB of KV blocks per transfer.",
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results here as JSON.",
)
def transfer_command(sizes: str, repeats: int, json_path: Path | None) -> None:
    """KV block transfer between two processes: shm, zmq, ucx vs memcpy and raw ZeroMQ."""
    try:
        sizes_mib = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(
            f"must be integers in MiB, got {sizes!r}", param_hint="--sizes"
        ) from None
    if not sizes_mib or min(sizes_mib) < BLOCK_BYTES >> 20:
        raise click.BadParameter(
            f"each size must be >= {BLOCK_BYTES >> 20} MiB (one block)", param_hint="--sizes"
        )
    results = bench_transfer(sizes_mib, repeats)
    for size, result in results.items():
        click.echo(report(size, result))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        click.echo(f"wrote {json_path}")


def bench_transfer(sizes_mib: list[int], repeats: int) -> dict:
    """{size in MiB (str): {"nbytes", "memcpy_gbps", "zmq_raw_gbps", "transfer_gbps":
    {backend: x or None}, "pack_gbps", "unpack_gbps", "pack_memcpy_gbps", "load_avg"}}."""
    from kvmesh.bench.pack import measure_pack
    from kvmesh.gpu.kv_pack import available_backends

    num_blocks = max(sizes_mib) * (1 << 20) // BLOCK_BYTES
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=_serve_receiver, args=(child, num_blocks), daemon=True)
    receiver.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the receiver process did not start within 120 s")
        endpoints = parent.recv()
        results = asyncio.run(_rounds(endpoints, num_blocks, sizes_mib, repeats))
    finally:
        receiver.terminate()  # SIGTERM: the receiver drains and unlinks its segment
        receiver.join(30)
    for size in sizes_mib:
        result = results[str(size)]
        pack = measure_pack(result["nbytes"], list(available_backends("cpu")), repeats=repeats)
        result.update(
            pack_gbps=pack["pack_gbps"],
            unpack_gbps=pack["unpack_gbps"],
            pack_memcpy_gbps=pack["memcpy_gbps"],
            load_avg=os.getloadavg()[0],
        )
    return results


def report(size: int, r: dict) -> str:
    """The figures of one size, each ratio with its baseline and target."""
    memcpy, raw, transfer = r["memcpy_gbps"], r["zmq_raw_gbps"], r["transfer_gbps"]
    pack_memcpy = r["pack_memcpy_gbps"]
    lines = [
        f"{size} MiB of KV blocks ({r['nbytes'] / 1e6:.0f} MB), load average {r['load_avg']:.2f}",
        f"  memcpy     {memcpy:6.2f} GB/s",
        f"  shm        {transfer['shm']:6.2f} GB/s  {transfer['shm'] / memcpy:.2f}x memcpy, "
        f"target >= {TARGETS['shm']}",
        f"  raw zmq    {raw:6.2f} GB/s",
        f"  zmq        {transfer['zmq']:6.2f} GB/s  {transfer['zmq'] / raw:.2f}x raw zmq, "
        f"target >= {TARGETS['zmq']}",
        f"  ucx        {transfer['ucx']:6.2f} GB/s"
        if transfer["ucx"] is not None
        else "  ucx        ucxx not installed",
        f"  memcpy     {pack_memcpy:6.2f} GB/s  (measure_pack's baseline for pack/unpack)",
    ]
    for backend, gbps in r["pack_gbps"].items():
        target = f", target >= {TARGETS[backend]}" if backend in TARGETS else ""
        lines.append(
            f"  pack {backend:<5} {gbps:6.2f} GB/s  {gbps / pack_memcpy:.2f}x memcpy"
            f"{target}; unpack {r['unpack_gbps'][backend]:.2f} GB/s"
        )
    return "\n".join(lines)


# --- this process: the sender ---


async def _rounds(endpoints: dict, num_blocks: int, sizes_mib: list[int], repeats: int):
    import numpy as np

    from kvmesh.actors.base import Actor, ActorConfig
    from kvmesh.transport import ucx
    from kvmesh.transport.dataplane import KVDataPlane

    kv_caches = _pool(num_blocks, shared=False)
    backends = ["shm", "zmq"] + (["ucx"] if ucx.available() else [])
    config = ActorConfig(actor_id="bench-sender", heartbeat_interval=1.0, liveness=10)
    rng = np.random.default_rng(0)
    raw = _RawZmq(endpoints["raw"])
    results = {}

    class Sender(Actor):
        role = "prefill"  # KvPoolQuery and KvWrite come from workers only

    async with Sender(config) as sender:
        await sender.connect("to_receiver", endpoints["actor"], timeout=30)
        planes = {b: KVDataPlane(sender, kv_caches, backend=b) for b in backends}
        for size in sizes_mib:
            n = size * (1 << 20) // BLOCK_BYTES
            nbytes = n * BLOCK_BYTES
            src = rng.choice(num_blocks, n, replace=False)
            dst = rng.choice(num_blocks, n, replace=False)
            buffers = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
            best = dict.fromkeys(["memcpy", "zmq_raw", *planes], float("inf"))
            for i in range(repeats + 1):  # round 0 is untimed
                for name in best:
                    start = time.perf_counter()
                    if name == "memcpy":
                        np.copyto(buffers[1], buffers[0])
                    elif name == "zmq_raw":
                        raw.send(buffers[0])
                    else:
                        await planes[name].write("bench-receiver", f"{name}-{size}-{i}", src, dst)
                    if i:
                        best[name] = min(best[name], time.perf_counter() - start)
            gbps = {name: nbytes / seconds / 1e9 for name, seconds in best.items()}
            results[str(size)] = {
                "nbytes": nbytes,
                "memcpy_gbps": gbps["memcpy"],
                "zmq_raw_gbps": gbps["zmq_raw"],
                "transfer_gbps": {b: gbps.get(b) for b in ("shm", "zmq", "ucx")},
            }
        for plane in planes.values():
            await plane.close()
    raw.close()
    return results


class _RawZmq:
    """The baseline: a bare DEALER sending one copy=False frame, waiting for the answer."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, payload) -> None:
        self.sock.send(payload, copy=False)
        self.sock.recv()

    def close(self) -> None:
        self.context.destroy(linger=0)


def _pool(num_blocks: int, shared: bool, actor_id: str = ""):
    import torch

    from kvmesh.transport.dataplane import allocate_shared_pool
    from kvmesh.transport.kv_layout import KVLayout

    layout = KVLayout(LAYERS, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.bfloat16)
    if shared:
        kv_caches, segment = allocate_shared_pool(layout, actor_id)
    else:
        shape = (2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        kv_caches, segment = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(LAYERS)], None
    for cache in kv_caches:
        cache.fill_(1.0)  # touch every page now, not in the first transfer
    return (kv_caches, segment) if shared else kv_caches


# --- the receiver process ---


def _serve_receiver(conn, num_blocks: int) -> None:
    """The receiving actor (pool in shared memory) and the raw ZeroMQ echo; serves until
    SIGTERM."""
    import zmq

    from kvmesh import log
    from kvmesh.actors.base import Actor, ActorConfig
    from kvmesh.transport.dataplane import DataPlaneHandlers, KVDataPlane

    log.configure("warning")

    class Receiver(Actor):
        role = "decode"

        async def setup(self) -> None:
            kv_caches, segment = _pool(num_blocks, shared=True, actor_id=self.actor_id)
            # the bytes alone are measured: writes need no grant here
            self.kv_plane = KVDataPlane(self, kv_caches, segment=segment, require_grants=False)
            DataPlaneHandlers(self.kv_plane).register(self)
            endpoint = self.open("from_peers", zmq.ROUTER, "tcp://127.0.0.1:0", bind=True)
            conn.send({"actor": endpoint, "raw": _start_raw_echo()})

        async def close(self) -> None:
            await super().close()
            if hasattr(self, "kv_plane"):
                await self.kv_plane.close()

    config = ActorConfig(actor_id="bench-receiver", heartbeat_interval=1.0, liveness=10)
    Receiver(config).run()


def _start_raw_echo() -> str:
    """A bare ROUTER on its own thread: answers b"k" to every message; returns its endpoint."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")

    def echo() -> None:
        while True:
            identity, _ = sock.recv_multipart(copy=False)
            sock.send_multipart([identity, b"k"])

    threading.Thread(target=echo, daemon=True).start()
    return sock.last_endpoint.decode()
