"""The object tier against a real S3-compatible server (moto, its own process, over HTTP):
a round trip through the bucket behind host and disk, both write policies, damaged
objects as misses, a restart that lists the bucket, clear errors for a missing bucket or
bad credentials, and a killed server that costs hits, never a failed call."""

import threading
import time
import uuid

import obstore
import pytest

from kvmesh.cache import object_tier
from kvmesh.cache.object_tier import HEADER, ObjectTier, parse_url
from kvmesh.cache.store import TieredStore
from kvmesh.protocol import BlockRemoved, BlockStored
from tests.cache.s3server import MotoServer, aws_env  # noqa: F401 (a fixture)
from tests.cache.test_tiers import RECORD, A, B, C, D, E, F, X, make_disk, make_host, make_record
from tests.cache.test_tiers import read_hits as read_staged

FINGERPRINT = "tiny-float32-b16"

__all__ = ["make_host"]  # a fixture, used by name


@pytest.fixture(scope="module")
def s3():
    server = MotoServer()
    yield server
    server.kill()


@pytest.fixture
def bucket(s3, aws_env) -> str:  # noqa: F811
    """A fresh bucket's URL, with a prefix, on the module's server."""
    return s3.create_bucket(f"kv-{uuid.uuid4().hex[:12]}") + "/cluster-a"


@pytest.fixture
def make_objects(s3):
    """make_objects(url, fingerprint, server) -> a checked ObjectTier, closed after."""
    tiers = []

    def make(url: str, fingerprint: str = FINGERPRINT, server: MotoServer = s3) -> ObjectTier:
        tier = ObjectTier(url, RECORD, fingerprint, endpoint=server.endpoint)
        tiers.append(tier)
        tier.check()
        return tier

    yield make
    for tier in tiers:
        tier.close()


def object_store(store: TieredStore) -> TieredStore:
    """The store, its object tier's writes finished (they run in the background)."""
    assert store.objects.flush()
    return store


def keys(objects: ObjectTier) -> list[str]:
    """The bucket's keys under the tier's URL prefix."""
    prefix = objects.root.split("/")[0]
    return sorted(meta["path"] for batch in obstore.list(objects.bucket, prefix) for meta in batch)


def in_put_order(events: list) -> list:
    """The events with each object-tier BlockStored's hashes sorted: background writes
    finish (and are announced) in any order; these tests put blocks in hash order."""
    return [
        BlockStored(block_hashes=sorted(e.block_hashes), tier="object")
        if isinstance(e, BlockStored) and e.tier == "object"
        else e
        for e in events
    ]


def test_blocks_leaving_the_host_come_back_from_the_bucket(make_host, make_objects, bucket):
    store = TieredStore(make_host(4), objects=make_objects(bucket))
    for h in (A, B, C, D, E, F):
        assert store.put(h, make_record(h))
    object_store(store)
    assert [store.tier_of(h) for h in (A, B, C, X)] == ["object", "object", "host", None]
    assert keys(store.objects) == [f"cluster-a/{FINGERPRINT}/{h:016x}.kv" for h in sorted((A, B))]
    assert BlockStored(block_hashes=[A, B], tier="object") in in_put_order(store.take_events())

    hits = store.get_leading([A, B, X])
    assert [(hit.block_hash, hit.tier) for hit in hits] == [(A, "object"), (B, "object")]
    assert read_staged(store, hits) == [make_record(A), make_record(B)]
    # promoted into the slots of C and D (least recently used), which went to the bucket
    object_store(store)
    assert [store.tier_of(h) for h in (A, B, C, D, E)] == [
        "host",
        "host",
        "object",
        "object",
        "host",
    ]
    counted = store.counters()["object"]
    assert (counted.lookups, counted.hits) == (3, 2)


@pytest.mark.parametrize(("write", "in_bucket"), [("demoted", {A, B, C}), ("evicted", {A})])
def test_write_policies(make_host, make_objects, bucket, tmp_path, write, in_bucket):
    """Host of 1 slot over a disk of 2 files: A, B, C are demoted to disk, A then evicted."""
    disk = make_disk(tmp_path, num_files=2)
    store = TieredStore(make_host(1), disk, make_objects(bucket), object_write=write)
    for h in (A, B, C, D):
        assert store.put(h, make_record(h))
    object_store(store)
    assert set(store.objects) == in_bucket
    assert [store.tier_of(h) for h in (A, B, C, D)] == ["object", "disk", "disk", "host"]
    hits = store.get_leading([A, B, C, D])
    assert [hit.tier for hit in hits] == ["object", "disk", "disk", "host"]
    assert read_staged(store, hits[:1]) == [make_record(A)]


def _flip_payload_byte(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 1])


def _truncate(body: bytes) -> bytes:
    return body[: HEADER.size + RECORD // 2]


def _flip_magic(body: bytes) -> bytes:
    return b"X" + body[1:]


@pytest.mark.parametrize(
    "damage", [_flip_payload_byte, _truncate, _flip_magic, "B's object under A's key"]
)
def test_damaged_object_is_a_miss(make_host, make_objects, bucket, damage):
    objects = make_objects(bucket)
    for h in (A, B):
        assert objects.put(h, make_record(h))
    assert objects.flush()
    key = objects.key_of(A)
    if damage == "B's object under A's key":
        body = bytes(obstore.get(objects.bucket, objects.key_of(B)).bytes())
    else:
        body = damage(bytes(obstore.get(objects.bucket, key).bytes()))
    obstore.put(objects.bucket, key, body)
    store = TieredStore(make_host(4), objects=objects)
    assert store.get_leading([A, B]) == []  # A is a miss: the run ends before it
    assert A not in objects
    assert in_put_order(store.take_events()) == [
        BlockStored(block_hashes=[A, B], tier="object"),  # the puts above
        BlockRemoved(block_hashes=[A], tier="object"),
    ]
    assert read_staged(store, store.get_leading([B])) == [make_record(B)]
    assert objects.put(A, make_record(A)) and objects.flush()  # the next write repairs it
    assert read_staged(store, store.get_leading([A])) == [make_record(A)]


def test_a_restart_lists_its_own_blocks_from_the_bucket(make_objects, bucket):
    first = make_objects(bucket)
    for h in (A, B, C):
        first.put(h, make_record(h))
    assert first.flush()
    obstore.put(first.bucket, f"{first.root}/{D:016x}.kv", b"short")  # wrong size: skipped
    obstore.put(first.bucket, f"{first.root}/notes.txt", b"x" * (HEADER.size + RECORD))
    again = make_objects(bucket)
    assert set(again) == {A, B, C}
    assert set(make_objects(bucket, "another-model")) == set()
    assert set(make_objects(bucket.replace("/cluster-a", "/cluster-b"))) == set()


def test_reads_of_a_run_run_in_parallel(make_host, make_objects, bucket, monkeypatch):
    objects = make_objects(bucket)
    for h in (A, B, C, D):
        objects.put(h, make_record(h))
    assert objects.flush()
    together = threading.Barrier(4, timeout=20)  # broken unless all 4 GETs wait at once
    monkeypatch.setattr(objects, "_wait", together.wait)
    store = TieredStore(make_host(4), objects=objects)
    hits = store.get_leading([A, B, C, D])
    assert read_staged(store, hits) == [make_record(h) for h in (A, B, C, D)]


def test_missing_bucket_or_bad_credentials_is_a_clear_error_at_start(s3, aws_env):  # noqa: F811
    url = f"s3://kv-missing-{uuid.uuid4().hex[:8]}/p"
    with pytest.raises(
        ValueError,
        match=f"kv.object_url '{url}': cannot list the bucket "
        r"\(NoSuchBucket",
    ):
        ObjectTier(url, RECORD, FINGERPRINT, endpoint=s3.endpoint).check()
    denying = MotoServer(auth=True)  # knows no access key: every request is denied
    try:
        with pytest.raises(ValueError, match=r"cannot list the bucket \(InvalidAccessKeyId"):
            ObjectTier("s3://kv-any/p", RECORD, FINGERPRINT, endpoint=denying.endpoint).check()
    finally:
        denying.kill()
    for bad in ("kv-bucket/p", "http://host/bucket", "s3:///p"):
        with pytest.raises(ValueError, match="kv.object_url must look like s3://bucket"):
            parse_url(bad)


def test_killed_server_costs_hits_then_is_tried_again(
    make_host,
    make_objects,
    aws_env,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(object_tier, "RETRY_AFTER", 0.5)
    server = MotoServer()
    try:
        url = server.create_bucket("kv-killed")
        objects = make_objects(url, server=server)
        store = TieredStore(make_host(2), objects=objects)
        for h in (A, B, C, D):
            store.put(h, make_record(h))
        object_store(store)
        assert set(objects) == {A, B}
        server.kill()
        assert store.get_leading([A, B]) == []  # a miss, not an exception
        assert not objects.available and store.tier_of(A) is None
        assert not objects.put(E, make_record(E))  # dropped while the tier is down
        server = MotoServer(port=server.port)  # back, empty: the bucket is made again
        server.create_bucket("kv-killed")
        deadline = time.monotonic() + 30
        while not objects.available:  # RETRY_AFTER since the last failure
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert store.get_leading([A]) == []  # gone from the new server: not found, a miss
        assert A not in objects
        assert objects.put(E, make_record(E)) and objects.flush()
        assert read_staged(store, store.get_leading([E])) == [make_record(E)]
    finally:
        server.kill()
