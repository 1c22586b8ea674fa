"""The object tier: KV block records as objects in an S3-compatible bucket (kv.object_url),
behind the disk tier, shared by every node and cluster that points at it.

    s3://<bucket>/<prefix>/<fingerprint>/<hash:016x>.kv
        header (HEADER, 40 bytes, little-endian), then the record
        magic "KVMOBJCT" | version u32 | 0 u32 | block hash u64 | length u64 | XXH3-64 u64

Keys carry the model fingerprint (ModelConfig.fingerprint: weights, dtype, block size),
so one bucket serves many models and clusters: a cluster only ever lists and reads its
own fingerprint's keys. An object is read whole and checked (header, length, checksum)
before a byte of it is used: a corrupt, partial or foreign object is a miss, never
another block's KV; it leaves the index and the next write of that block overwrites it.

Index: the hashes this process believes the bucket holds, rebuilt by listing the
fingerprint's keys at start (what the cache actor then announces to the router) and grown
by its own writes. Other nodes' writes after our listing are not seen (they are found
again by the next start); the bucket has no capacity here, its lifecycle rules expire
objects, and a read of an expired one is a miss.

Writes run in the background (WRITERS threads): `put` copies the record and returns at
once, so a store call never waits for the network; at most MAX_PENDING_BYTES are queued,
beyond that a put is dropped (counted). Reads of a run are parallel: `get_many` issues
one GET per block, all at once (READERS threads).

Failures: any error but "not found" (connection refused, timeout, 5xx, denied) marks the
tier down for RETRY_AFTER seconds (logged once): while down, `available` is False, lookups
pass over the tier (misses) and puts are dropped; the first request after that tries
again. A killed object server costs hits, never requests. At start, `check` lists the
bucket: bad credentials or a missing bucket raise a ValueError naming kv.object_url.

Client: obstore (Rust object_store), chosen over boto3 measured against a moto server
process on this 2-core box, 64 x 1 MiB objects, 16 in parallel, best of 3:

    obstore 0.9.5   put 0.53 s (120 MiB/s)   get 0.40 s (159 MiB/s)   import 8 ms
    boto3 1.43.11   put 0.82 s ( 78 MiB/s)   get 0.65 s ( 98 MiB/s)   import 310 ms
    installed: obstore 12 MB, 1 dependency (typing-extensions); boto3 34 MB with
    botocore, s3transfer, jmespath, python-dateutil, urllib3

Credentials, region and endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, ...), read by
obstore; kv.object_endpoint overrides the endpoint (MinIO, moto; http:// allowed).

`latency` (benchmarks: KVMESH_OBJECT_LATENCY_MS for a cluster's cache actor) sleeps that
long in each request's thread before it is sent, as a far object store would: parallel
requests overlap their waits, as real round trips do.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import structlog
import xxhash

from kvmesh.cache.disk_tier import hash_of_name
from kvmesh.cache.host_tier import as_bytes

log = structlog.get_logger(__name__)

MAGIC = b"KVMOBJCT"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")  # magic, version, reserved, hash, length, checksum
SUFFIX = ".kv"  # object names: <16 hex digits of the block hash>.kv, as the disk tier's files
READERS = 16  # parallel GETs of a run
WRITERS = 4  # background PUTs
MAX_PENDING_BYTES = 256 << 20  # queued PUTs' records; more are dropped
RETRY_AFTER = 5.0  # seconds a failed tier is passed over before it is tried again
# A lookup waits for the run's GETs and a worker waits 2 s for its lookup
# (CacheClient.timeout): a stalled store must cost a miss well before that. PUTs run in
# the background, nobody waits on them: a loaded store gets longer.
CONNECT_TIMEOUT = "1s"
REQUEST_TIMEOUT = "1s"
PUT_TIMEOUT = "10s"


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket[/prefix]; a ValueError naming kv.object_url else."""
    scheme, sep, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not sep or not bucket:
        raise ValueError(f"kv.object_url must look like s3://bucket[/prefix], got {url!r}")
    return bucket, prefix.strip("/")


class ObjectTier:
    """Block records as checksummed objects in a bucket; see the module doc. Thread-safe:
    the store's thread calls it while its writer threads finish puts."""

    def __init__(
        self,
        url: str,
        record_bytes: int,
        fingerprint: str,
        endpoint: str = "",
        latency: float = 0.0,
    ) -> None:
        from obstore.store import S3Store

        if record_bytes < 1:
            raise ValueError(f"record_bytes must be >= 1, got {record_bytes}")
        bucket, prefix = parse_url(url)
        self.url = url
        self.record_bytes = record_bytes
        self.object_bytes = HEADER.size + record_bytes
        self.root = "/".join(part for part in (prefix, fingerprint or "unnamed") if part)
        self.latency = latency
        options = {"connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT}
        if endpoint.startswith("http://"):
            options["allow_http"] = True
        retry = {
            "max_retries": 1,
            "retry_timeout": timedelta(seconds=1),
            "backoff": {"init_backoff": timedelta(milliseconds=50)},
        }
        extra = {"endpoint": endpoint} if endpoint else {}
        self.bucket = S3Store(bucket, client_options=options, retry_config=retry, **extra)
        self._put_bucket = S3Store(  # the same bucket, for the background writes
            bucket, client_options=options | {"timeout": PUT_TIMEOUT}, retry_config=retry, **extra
        )
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._pending: dict[int, int] = {}  # being written: hash -> bytes
        self._stored: deque[int] = deque()  # written since take_stored
        self._removed: deque[int] = deque()  # found corrupt or gone since take_removed
        self._down_until = 0.0
        self.dropped = 0  # puts dropped: queue full or tier down
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="object-tier-get")
        self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="object-tier-put")

    # ---- index ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._held

    def __iter__(self) -> Iterator[int]:
        with self._lock:
            return iter(list(self._held))

    def key_of(self, block_hash: int) -> str:
        return f"{self.root}/{block_hash:016x}{SUFFIX}"

    @property
    def available(self) -> bool:
        """False while a recent failure has the tier passed over (see the module doc)."""
        return time.monotonic() >= self._down_until

    def check(self) -> int:
        """List the fingerprint's objects into the index; blocks found. A ValueError naming
        kv.object_url when the bucket cannot be listed (missing, denied, unreachable)."""
        import obstore

        found = set()
        try:
            for batch in obstore.list(self.bucket, self.root + "/", chunk_size=1000):
                for meta in batch:
                    block_hash = hash_of_name(meta["path"].rsplit("/", 1)[-1])
                    if block_hash is not None and meta["size"] == self.object_bytes:
                        found.add(block_hash)
        except Exception as exc:  # obstore raises its own and builtin errors
            raise ValueError(
                f"kv.object_url {self.url!r}: cannot list the bucket ({_reason(exc)}); check "
                "that it exists, kv.object_endpoint / AWS_ENDPOINT_URL, and the credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            ) from None
        with self._lock:
            self._held = found
        return len(found)

    # ---- writes -----------------------------------------------------------------------

    def put(self, block_hash: int, payload) -> bool:
        """Queue block_hash's record for writing (copied now); False when it is held,
        being written, or dropped (tier down, queue full)."""
        src = as_bytes(payload, "payload")
        if src.size != self.record_bytes:
            raise ValueError(f"payload holds {src.size} bytes, a block record {self.record_bytes}")
        with self._lock:
            if block_hash in self._held or block_hash in self._pending:
                return False
            if not self.available or sum(self._pending.values()) >= MAX_PENDING_BYTES:
                self.dropped += 1
                return False
            self._pending[block_hash] = self.object_bytes
        header = HEADER.pack(MAGIC, VERSION, 0, block_hash, src.size, xxhash.xxh3_64_intdigest(src))
        self._writers.submit(self._put, block_hash, header + src.tobytes())
        return True

    def _put(self, block_hash: int, body: bytes) -> None:
        import obstore

        ok = False
        try:
            self._wait()
            obstore.put(self._put_bucket, self.key_of(block_hash), body)
            ok = True
        except Exception as exc:
            self._failed("object_tier_put_failed", block_hash, exc)
        with self._lock:
            del self._pending[block_hash]
            if ok and block_hash not in self._held:
                self._held.add(block_hash)
                self._stored.append(block_hash)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued put finished; False if some still run after timeout."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._pending

    # ---- reads ------------------------------------------------------------------------

    def get_many(self, block_hashes: Sequence[int]) -> list[np.ndarray | None]:
        """Each block's record, all fetched in parallel; None for a miss (not held, not
        found, failing its checks, or an error: see the module doc)."""
        if not block_hashes:
            return []
        return list(self._readers.map(self._get, block_hashes))

    def _get(self, block_hash: int) -> np.ndarray | None:
        import obstore
        from obstore.exceptions import NotFoundError  # obstore raises FileNotFoundError

        if block_hash not in self._held or not self.available:
            return None
        try:
            self._wait()
            body = obstore.get(self.bucket, self.key_of(block_hash)).bytes()
        except (NotFoundError, FileNotFoundError):
            self._forget(block_hash)
            return None
        except Exception as exc:
            self._failed("object_tier_get_failed", block_hash, exc)
            return None
        data = np.frombuffer(memoryview(body), dtype=np.uint8)
        if not self._intact(data, block_hash):
            log.warning("object_tier_corrupt_object", key=self.key_of(block_hash), bytes=data.size)
            self._forget(block_hash)
            return None
        return data[HEADER.size :]

    def _intact(self, data: np.ndarray, block_hash: int) -> bool:
        if data.size != self.object_bytes:
            return False
        magic, version, _, stored_hash, length, checksum = HEADER.unpack(data[: HEADER.size])
        return (
            magic == MAGIC
            and version == VERSION
            and stored_hash == block_hash
            and length == self.record_bytes
            and xxhash.xxh3_64_intdigest(data[HEADER.size :]) == checksum
        )

    # ---- events, life -----------------------------------------------------------------

    def take_stored(self) -> list[int]:
        """Blocks written since the last call (their puts finished)."""
        return _drain(self._stored)

    def take_removed(self) -> list[int]:
        """Blocks found gone or corrupt since the last call (out of the index)."""
        return _drain(self._removed)

    def close(self) -> None:
        """Finish the queued puts (their timeouts bound the wait) and stop the threads."""
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._writers.shutdown(wait=True)

    def _wait(self) -> None:
        if self.latency > 0:
            time.sleep(self.latency)

    def _forget(self, block_hash: int) -> None:
        with self._lock:
            if block_hash in self._held:
                self._held.discard(block_hash)
                self._removed.append(block_hash)

    def _failed(self, event: str, block_hash: int, exc: Exception) -> None:
        """An error other than not-found: pass over the tier for RETRY_AFTER seconds."""
        first = self.available
        self._down_until = time.monotonic() + RETRY_AFTER
        if first:
            log.warning(
                event,
                url=self.url,
                block_hash=block_hash,
                error=_reason(exc),
                retry_after_s=RETRY_AFTER,
            )


def _drain(queue: deque[int]) -> list[int]:
    out = []
    while queue:
        out.append(queue.popleft())
    return out


def _reason(exc: Exception) -> str:
    """An obstore error's first line (they run to a dozen lines of debug context), and the
    S3 error code where the server sent one (NoSuchBucket, InvalidAccessKeyId, ...)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    code = re.search(r"<Code>([^<]+)</Code>", text)
    return f"{code.group(1)}: {first}" if code else f"{type(exc).__name__}: {first}"
