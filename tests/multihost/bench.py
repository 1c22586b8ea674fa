"""KV transfer between two hosts in network namespaces: kvmesh's ZeroMQ data plane
(KVDataPlane, backend zmq) against a bare ZeroMQ DEALER -> ROUTER baseline between the
same two namespaces in the same run (root, ip):

    python -m tests.multihost.bench --sizes 64,256 --repeats 3 [--json out.json]
    python -m tests.multihost.bench --ttft 1000 --repeats 4      # TTFT, 4 (+1 warm-up) prompts

Geometry and rounds as `kvmesh bench transfer` (kvmesh/bench/transfer.py): Llama-3-8B KV,
2 MiB a block; one untimed round, then each figure the best of `repeats` rounds, the
baseline and the transfer back to back. Host b runs the receiving actor (its pool in b's
own /dev/shm) and the raw echo, host a the sender. Exits non-zero when a figure is
missing or the receiver fails.

--ttft TOKENS: mean time to first token of `repeats` distinct TOKENS-token prompts
(max_tokens 4, streamed one at a time by the openai client on host a) on three hosts
(a: frontend, router; b: prefill; c: decode, cache), with every prompt prefilled on b
and its KV sent to c (router.disagg_min_tokens = 0) against prefilled on c itself, each
on a fresh cluster in the same run; a request that fails fails the run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.multihost.netns import NetnsHosts
from tests.multihost.nodes import pythonpath

TARGET = 0.8  # zmq data plane / raw zmq, as kvmesh bench transfer


def receive(address: str, num_blocks: int) -> None:
    """Host b: the receiving actor and the raw echo on `address`; prints their endpoints."""
    import threading

    import zmq

    from kvmesh import log
    from kvmesh.actors.base import Actor, ActorConfig
    from kvmesh.bench.transfer import _pool
    from kvmesh.transport.dataplane import DataPlaneHandlers, KVDataPlane

    log.configure("warning")
    context = zmq.Context()
    echo = context.socket(zmq.ROUTER)
    echo.bind(f"tcp://{address}:0")

    def answer() -> None:
        while True:
            identity, _ = echo.recv_multipart(copy=False)
            echo.send_multipart([identity, b"k"])

    threading.Thread(target=answer, daemon=True).start()

    class Receiver(Actor):
        role = "decode"

        async def setup(self) -> None:
            kv_caches, segment = _pool(num_blocks, shared=True, actor_id=self.actor_id)
            self.kv_plane = KVDataPlane(self, kv_caches, segment=segment, require_grants=False)
            DataPlaneHandlers(self.kv_plane).register(self)
            endpoint = self.open("from_peers", zmq.ROUTER, f"tcp://{address}:0", bind=True)
            ends = {"actor": endpoint, "raw": echo.last_endpoint.decode()}
            print(json.dumps(ends), flush=True)

        async def close(self) -> None:
            await super().close()
            if hasattr(self, "kv_plane"):
                await self.kv_plane.close()  # unlinks the pool's segment

    Receiver(ActorConfig(actor_id="bench-receiver", heartbeat_interval=1.0, liveness=10)).run()


def send(endpoints: dict, num_blocks: int, sizes_mib: list[int], repeats: int) -> dict:
    """Host a: {size: {"nbytes", "zmq_raw_gbps", "zmq_gbps"}}."""
    import numpy as np

    from kvmesh.actors.base import Actor, ActorConfig
    from kvmesh.bench.transfer import BLOCK_BYTES, _pool, _RawZmq
    from kvmesh.transport.dataplane import KVDataPlane

    async def rounds() -> dict:
        kv_caches = _pool(num_blocks, shared=False)
        rng = np.random.default_rng(0)
        raw = _RawZmq(endpoints["raw"])
        results = {}

        class Sender(Actor):
            role = "prefill"

        config = ActorConfig(actor_id="bench-sender", heartbeat_interval=1.0, liveness=10)
        async with Sender(config) as sender:
            await sender.connect("to_receiver", endpoints["actor"], timeout=30)
            plane = KVDataPlane(sender, kv_caches, backend="zmq")
            for size in sizes_mib:
                n = size * (1 << 20) // BLOCK_BYTES
                src = rng.choice(num_blocks, n, replace=False)
                dst = rng.choice(num_blocks, n, replace=False)
                payload = np.ones(n * BLOCK_BYTES, np.uint8)
                best = {"zmq_raw": float("inf"), "zmq": float("inf")}
                for i in range(repeats + 1):
                    for name in best:
                        start = time.perf_counter()
                        if name == "zmq_raw":
                            raw.send(payload)
                        else:
                            await plane.write("bench-receiver", f"{size}-{i}", src, dst)
                        if i:
                            best[name] = min(best[name], time.perf_counter() - start)
                nbytes = n * BLOCK_BYTES
                results[str(size)] = {
                    "nbytes": nbytes,
                    "zmq_raw_gbps": nbytes / best["zmq_raw"] / 1e9,
                    "zmq_gbps": nbytes / best["zmq"] / 1e9,
                }
            await plane.close()
        raw.close()
        return results

    return asyncio.run(rounds())


def bench(sizes_mib: list[int], repeats: int) -> dict:
    from kvmesh.bench.transfer import BLOCK_BYTES

    num_blocks = max(sizes_mib) * (1 << 20) // BLOCK_BYTES
    env = {"PYTHONPATH": pythonpath()}
    me = [sys.executable, "-m", "tests.multihost.bench"]
    with NetnsHosts(2) as hosts:
        address = hosts.host("b").address
        receiver = subprocess.Popen(
            hosts.argv("b", [*me, "receive", address, str(num_blocks)]),
            stdout=subprocess.PIPE,
            text=True,
            env=_env(env),
        )
        try:
            line = receiver.stdout.readline()
            if not line:
                raise RuntimeError(f"the receiver on host b exited {receiver.wait()}")
            job = json.dumps(
                {
                    "endpoints": json.loads(line),
                    "num_blocks": num_blocks,
                    "sizes": sizes_mib,
                    "repeats": repeats,
                }
            )
            done = subprocess.run(
                hosts.argv("a", [*me, "send", job]), capture_output=True, text=True,
                env=_env(env), timeout=900,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"the sender on host a failed:\n{done.stderr[-3000:]}")
            results = json.loads(done.stdout.splitlines()[-1])
            for result in results.values():
                result["load_avg"] = os.getloadavg()[0]
            return results
        finally:
            receiver.terminate()
            receiver.wait(30)


def ttft(prompt_tokens: int, num_requests: int, model_dir: Path, tmp: Path) -> dict:
    """Mean TTFT (s) of `num_requests` distinct prompts, streamed one at a time by the
    openai client on host a, with remote prefill (prefill on b, KV to c) and local
    prefill (on c), each on a fresh three-host cluster."""
    import statistics

    from kvmesh.bench.cluster import free_port_range
    from tests.multihost.nodes import Node, ask, write_config
    from tests.prompts import random_prompts

    roles = {"a": ["frontend", "router"], "b": ["prefill"], "c": ["decode", "cache"]}
    prompts = random_prompts([prompt_tokens] * (num_requests + 1), seed=7)
    results = {}
    with NetnsHosts(3) as hosts:
        for mode, min_tokens in (("remote", 0), ("local", 10**9)):
            base = free_port_range(40)
            run = tmp / mode
            run.mkdir(parents=True)
            router = f"[router]\ndisagg_min_tokens = {min_tokens}\n"
            config = write_config(run / "cluster.toml", hosts, model_dir, base, roles, router)
            nodes = [Node(hosts, run, config, name) for name in ("c", "b", "a")]
            try:
                url = f"http://{hosts.host('a').address}:{base + 30}/v1"
                nodes[-1].wait_said(f"kvmesh is up: {url}", timeout=600)
                job = {"url": url, "model": model_dir.name, "requests": [
                    {"id": i, "prompt": p, "max_tokens": 4, "stream": True}
                    for i, p in enumerate(prompts)
                ]}  # fmt: skip
                got = ask(hosts, "a", job, timeout=900)
                errors = [r["error"] for r in got if "error" in r]
                if errors:
                    raise RuntimeError(f"{mode} prefill: {errors}")
                # the first request warms the path (links, first KV write): left out
                results[mode] = statistics.mean(r["ttft"] for r in got[1:])
            finally:
                for node in nodes:
                    node.stop()
    results["load_avg"] = os.getloadavg()[0]
    return results


def _env(extra: dict) -> dict:
    return os.environ | extra


def main() -> int:
    if sys.argv[1:2] == ["receive"]:
        receive(sys.argv[2], int(sys.argv[3]))
        return 0
    if sys.argv[1:2] == ["send"]:
        job = json.loads(sys.argv[2])
        print(json.dumps(send(job["endpoints"], job["num_blocks"], job["sizes"], job["repeats"])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.multihost.bench", description=__doc__)
    parser.add_argument("--sizes", default="64,256", help="MiB of KV blocks per transfer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--ttft", type=int, metavar="TOKENS", help="instead: TTFT, remote vs local prefill"
    )
    args = parser.parse_args()
    if args.ttft:
        import tempfile

        from kvmesh.gpu.tiny import init_tiny

        with tempfile.TemporaryDirectory() as tmp:
            model = init_tiny(Path(tmp) / "tiny-llama", seed=0)
            r = ttft(args.ttft, args.repeats, model, Path(tmp))
        print(
            f"TTFT of {args.ttft}-token prompts across hosts: remote prefill "
            f"{r['remote'] * 1e3:.0f} ms, local prefill {r['local'] * 1e3:.0f} ms, "
            f"{r['remote'] / r['local']:.2f}x local; load average {r['load_avg']:.2f}"
        )
        if args.json:
            args.json.write_text(json.dumps(r, indent=2))
        return 0
    results = bench([int(s) for s in args.sizes.split(",")], args.repeats)
    for size, r in results.items():
        ratio = r["zmq_gbps"] / r["zmq_raw_gbps"]
        print(
            f"{size} MiB between namespaces: raw zmq {r['zmq_raw_gbps']:.2f} GB/s, "
            f"kvmesh zmq {r['zmq_gbps']:.2f} GB/s, {ratio:.2f}x raw (target >= {TARGET}); "
            f"load average {r['load_avg']:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
