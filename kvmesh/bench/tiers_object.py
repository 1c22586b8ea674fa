"""`kvmesh bench tiers`, the object tier: a bucket behind small host and disk tiers, with
an injected latency per object request, against recomputing.

The bucket: a moto S3 server process the bench starts on a free loopback port (moto is
in the test extra: `pip install 'moto[server]'`), or a real S3-compatible store named by
--object-url and --object-endpoint (credentials from the AWS environment). Every run
writes under a fresh prefix, so each starts with an empty tier.

Latency: ObjectTier's `latency` (--object-latency-ms, default 50) sleeps that long in each
request's thread before sending it, as a far store's round trip would: the GETs of a run
are parallel, so a window of blocks costs about one round trip plus the transfer.

Multi-turn configurations (kvmesh.bench.tiers's workload), beside device / host / host_disk:
  small   host `host_blocks` over a disk of `small_disk_blocks`: DRAM + SSD smaller than
          the working set, so what falls out of the disk is recomputed
  object  the same, with the object tier behind them (object_write "demoted")

Crossover (--crossover-tokens): per prompt length L, TTFT of a prompt whose every block is
only in the bucket (a fresh engine over an empty host tier and the bucket, listed at
start) against the same prompt recomputed on a fresh engine with no tiers. Fetching wins
where fetch < recompute; outputs must be equal (else the command fails).
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

DEFAULT_LATENCY_MS = 50.0
BLOCK_SIZE = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on 127.0.0.1:port, its own process, reached over HTTP;
    `auth`: IAM checks on, so no credentials are valid (every request is denied)."""

    def __init__(self, port: int | None = None, auth: bool = False) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"moto server on port {self.port} did not start (is moto[server] "
                        "installed? pip install 'moto[server]')"
                    ) from None
                time.sleep(0.05)

    def create_bucket(self, name: str) -> str:
        """Make a bucket (a plain path-style PUT); its s3:// URL."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"moto: creating bucket {name!r} answered {response.status}")
        return f"s3://{name}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class Bucket:
    """Where the bench's object tiers live: `tier()` is a fresh, empty prefix each call;
    `tier(prefix)` reopens one (listing it, as a restarted cache actor would)."""

    def __init__(self, record_bytes: int, latency: float, url: str = "", endpoint: str = ""):
        self.record_bytes = record_bytes
        self.latency = latency
        self.server = None
        if not url:
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "kvmesh-bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kvmesh-bench")
            os.environ.setdefault("AWS_REGION", "us-east-1")
            self.server = MotoServer()
            url, endpoint = self.server.create_bucket("kvmesh-bench"), self.server.endpoint
        self.url = url.rstrip("/")
        self.endpoint = endpoint
        self._runs = itertools.count()
        self._id = uuid.uuid4().hex[:8]

    def tier(self, prefix: str | None = None):
        from kvmesh.cache.object_tier import ObjectTier

        prefix = prefix or f"bench-{self._id}-{next(self._runs)}"
        tier = ObjectTier(
            f"{self.url}/{prefix}", self.record_bytes, "bench", self.endpoint, self.latency
        )
        tier.check()
        tier.prefix = prefix
        return tier

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()


def crossover(
    bench, bucket: Bucket, lengths: list[int], seed: int, repeats: int
) -> list[dict[str, float | int | bool]]:
    """Per prompt length: TTFT fetching every block from the bucket vs recomputing; see
    the module doc. Each figure is the best of `repeats`."""
    from kvmesh.bench.tiers import make_connector, serve_one
    from kvmesh.bench.trace import random_prompt

    rng = random.Random(seed)
    vocab = bench.config.vocab_size
    rows = []
    for length in lengths:
        prompt = random_prompt(rng, length, vocab)
        fillers = [random_prompt(rng, length, vocab) for _ in range(3)]
        pool = length // BLOCK_SIZE + 4  # one prompt at a time: the next pushes it out
        num_blocks = length // BLOCK_SIZE
        best = {"recompute": None, "fetch": None}
        outputs = {}
        hits = None  # the fewest cached tokens of any repeat (a miss shows)
        for _ in range(repeats):
            ttft, out = serve_one(_engine(bench, pool, None), prompt, 4)
            outputs["recompute"] = out.token_ids
            best["recompute"] = min(best["recompute"] or ttft, ttft)

            # the prompt's blocks, pushed off the device by the first filler, go to a host
            # tier of one prompt's size (a step offloads them all at once) and on into
            # the bucket as the next fillers push them out of it
            objects = bucket.tier()
            writer = make_connector(bench.record_bytes, num_blocks + 1, objects=objects)
            try:
                engine = _engine(bench, pool, writer)
                for served in (prompt, *fillers):
                    serve_one(engine, served, 4)
                if not objects.flush():
                    raise RuntimeError("object tier: writes did not finish in 30 s")
            finally:
                writer.close()

            listed = bucket.tier(objects.prefix)  # a fresh tier lists it, as at a restart
            reader = make_connector(bench.record_bytes, num_blocks + 8, objects=listed)
            try:
                engine = _engine(bench, pool, reader)
                ttft, out = serve_one(engine, prompt, 4)
            finally:
                reader.close()
            outputs["fetch"] = out.token_ids
            hits = min(hits if hits is not None else out.num_cached_tokens, out.num_cached_tokens)
            best["fetch"] = min(best["fetch"] or ttft, ttft)
        rows.append(
            {
                "prompt_tokens": length,
                "ttft_recompute_s": best["recompute"],
                "ttft_fetch_s": best["fetch"],
                "fetch_vs_recompute": best["fetch"] / best["recompute"],
                "cached_tokens": hits,
                "outputs_equal": outputs["fetch"] == outputs["recompute"],
            }
        )
    return rows


def _engine(bench, pool: int, connector):
    from kvmesh.engine.engine import Engine

    return Engine(
        bench.model,
        bench.tokenizer,
        bench.config,
        block_size=BLOCK_SIZE,
        num_blocks=pool,
        max_num_seqs=1,
        kv_connector=connector,
    )


def report_crossover(rows: list[dict], latency_ms: float) -> str:
    lines = [
        f"object tier vs recompute, every block only in the bucket, {latency_ms:g} ms per "
        "object request:",
        f"{'prompt':>8} {'recompute':>10} {'fetch':>9} {'fetch/recompute':>16} {'cached':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['prompt_tokens']:>8} {r['ttft_recompute_s'] * 1e3:>8.1f}ms "
            f"{r['ttft_fetch_s'] * 1e3:>7.1f}ms {r['fetch_vs_recompute']:>15.2f}x "
            f"{r['cached_tokens']:>7}"
        )
    wins = [r["prompt_tokens"] for r in rows if r["fetch_vs_recompute"] < 1]
    lines.append(
        f"fetching beats recomputing from {min(wins)} prompt tokens"
        if wins
        else "fetching beat recomputing at no length measured"
    )
    return "\n".join(lines)
