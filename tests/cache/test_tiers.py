"""The cache tiers: HostTier across processes and under concurrent rewrites, DiskTier
against every corruption and crash, its file reuse and spares, TieredStore demotion,
promotion, kept blocks, leading runs and events."""

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from kvmesh.cache import disk_tier, host_tier
from kvmesh.cache.disk_tier import HEADER, DiskTier
from kvmesh.cache.host_tier import GEN, HASH, HostTier, num_slots_for, pool_bytes
from kvmesh.cache.store import Hit, TieredStore
from kvmesh.kv.segment import SHM_DIR, segment_name
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored

RECORD = 1000  # bytes of one block record; not a multiple of the 64-byte slot alignment
A, B, C, D, E, F, X = (0xA0 + i for i in range(7))  # X is never stored


def make_record(block_hash: int) -> bytes:
    """A record whose bytes differ for every block."""
    return np.random.default_rng(block_hash).integers(0, 256, RECORD, np.uint8).tobytes()


@pytest.fixture
def make_host():
    """make_host(num_slots, policy) -> an owned HostTier, closed after the test."""
    tiers = []

    def make(num_slots: int = 4, policy: str = "lru") -> HostTier:
        tier = HostTier.create(
            segment_name("test-cache"), RECORD, pool_bytes(num_slots, RECORD), policy
        )
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()


_disks: list[DiskTier] = []


@pytest.fixture(autouse=True)
def _close_disks():
    """Stop the spare-making thread of every disk tier a test opened."""
    yield
    while _disks:
        _disks.pop().close()


def make_disk(path: Path, num_files: int = 4, policy: str = "lru") -> DiskTier:
    disk = DiskTier(path, RECORD, num_files * (HEADER.size + RECORD), policy)
    _disks.append(disk)
    return disk


def listing(path: Path) -> list[str]:
    """The directory's block files and leftovers, less what a disk tier keeps beside them:
    spares (made in the background), its lock and its manifest."""
    return sorted(
        name
        for name in os.listdir(path)
        if name not in (".spares", ".lock", "manifest.json") and not name.startswith(".spare.")
    )


def wait_for_spares(disk: DiskTier, num_spares: int) -> None:
    deadline = time.monotonic() + 30
    while len(disk.spares) < num_spares:
        assert time.monotonic() < deadline, f"{len(disk.spares)} spares, {num_spares} wanted"
        time.sleep(0.01)


def put(host: HostTier, block_hash: int) -> int:
    """Allocate, write and commit block_hash in host; its slot."""
    slot, _ = host.allocate(block_hash)
    host.write(slot, block_hash, make_record(block_hash))
    assert host.commit(block_hash)
    return slot


def read(host: HostTier, slot: int, block_hash: int) -> bytes | None:
    out = np.empty(RECORD, np.uint8)
    return out.tobytes() if host.read_into(slot, block_hash, out) else None


# ---- HostTier --------------------------------------------------------------------------


def test_num_slots_for_counts_the_header_table_and_slot_alignment():
    assert pool_bytes(3, RECORD) == 4096 + 3 * 1024
    assert num_slots_for(4096 + 3 * 1024, RECORD) == 3
    assert num_slots_for(4096 + 3 * 1024 - 1, RECORD) == 2
    assert num_slots_for(4096, RECORD) == 0
    with pytest.raises(ValueError, match=r"kv.host_gb.* holds no block record of 1000 bytes"):
        HostTier.create(segment_name("test-cache"), RECORD, 4096)


def _child_reads_and_writes(info, read_slot, read_hash, write_slot, write_hash, results):
    tier = HostTier.attach(info)
    out = bytearray(RECORD)
    results.put(bytes(out) if tier.read_into(read_slot, read_hash, out) else None)
    tier.write(write_slot, write_hash, make_record(write_hash))
    tier.close()


def test_round_trip_across_processes(make_host):
    host = make_host(4)
    slot_a = put(host, A)
    slot_b, _ = host.allocate(B)  # the child writes this one
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(
        target=_child_reads_and_writes, args=(host.info, slot_a, A, slot_b, B, results)
    )
    child.start()
    got = results.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert got == make_record(A)
    assert host.commit(B)
    assert read(host, slot_b, B) == make_record(B)
    assert host.lookup([A, B]) == [slot_a, slot_b]


class CopyThenRewrite:
    """Stands in for numpy in host_tier: after read_into's payload copy, `rewrite` runs,
    as a writer in another process would between the copy and the header check."""

    def __init__(self, rewrite):
        self.rewrite = rewrite

    def __getattr__(self, name):
        return getattr(np, name)

    def copyto(self, dst, src):
        np.copyto(dst, src)
        self.rewrite()


@pytest.mark.parametrize(
    ("rewrite", "afterwards"),
    [
        # a writer made gen odd and is filling the payload: A stays unreadable
        pytest.param(
            lambda header: header.__setitem__(GEN, header[GEN] + 1), None, id="write-began"
        ),
        # the slot now holds B (the header says so): A is gone
        pytest.param(
            lambda header: (header.__setitem__(HASH, B), header.__setitem__(GEN, header[GEN] + 2)),
            None,
            id="other-block-written",
        ),
        # A written again, identical: this read misses, the next one hits
        pytest.param(
            lambda header: header.__setitem__(GEN, header[GEN] + 2),
            make_record(A),
            id="same-block-rewritten",
        ),
    ],
)
def test_slot_rewritten_between_copy_and_check_is_a_miss(
    make_host, monkeypatch, rewrite, afterwards
):
    host = make_host(2)
    slot = put(host, A)
    header = host._headers[slot]
    monkeypatch.setattr(host_tier, "np", CopyThenRewrite(lambda: rewrite(header)))
    assert read(host, slot, A) is None
    monkeypatch.undo()
    assert read(host, slot, A) == afterwards


def test_corrupt_payload_byte_is_a_miss(make_host):
    host = make_host(2)
    slot = put(host, A)
    assert read(host, slot, A) == make_record(A)
    host._payloads[slot, RECORD - 1] ^= 0x01
    assert read(host, slot, A) is None


def test_wrong_hash_unwritten_and_failed_writes_are_misses(make_host):
    host = make_host(3)
    slot = put(host, A)
    assert read(host, slot, B) is None
    assert read(host, slot + 1, B) is None  # never written
    with pytest.raises(ValueError, match="out holds 999 bytes, a block record 1000"):
        host.read_into(slot, A, bytearray(RECORD - 1))
    with pytest.raises(ValueError, match=r"slot must be in \[0, 3\), got 3"):
        host.read_into(3, A, bytearray(RECORD))
    failed, _ = host.allocate(C)
    with pytest.raises(RuntimeError), host.writing(failed, C) as payload:
        payload[:] = 7
        raise RuntimeError("writer died")
    assert read(host, failed, C) is None
    assert host.commit(C) is False  # and its slot is free again
    assert host.allocate(D) == (failed, None)


def test_allocate_evicts_by_policy_and_never_a_slot_being_written(make_host):
    host = make_host(3)
    slots = [put(host, h) for h in (A, B, C)]
    assert slots == [0, 1, 2]
    assert host.lookup([A, X, B]) == [0]  # the run stops at X; A is now most recent
    assert host.allocate(D) == (1, B)  # LRU: B
    assert B not in host and host.is_pending(D)
    assert read(host, 1, B) == make_record(B)  # readable until the writer begins
    assert host.allocate(E, keep={C}) == (0, A)
    assert host.allocate(F, keep={C}) is None  # D and E are being written, C kept
    host.abort(E)
    assert host.allocate(F) == (0, None)
    host.write(1, D, make_record(D))
    assert host.commit(D) and read(host, 1, B) is None
    assert host.commit(D) is False and host.commit(X) is False  # repeated, unknown
    host.abort(X)
    assert host.lookup([C, D]) == [2, 1]
    assert host.remove(C) and not host.remove(C)
    assert host.lookup([C]) == [] and read(host, 2, C) is None
    assert len(host) == 1


def test_clear_drops_held_blocks_and_fails_pending_commits(make_host):
    host = make_host(3)
    slot = put(host, A)
    pending, _ = host.allocate(B)
    assert host.clear() == [A]
    host.write(pending, B, make_record(B))
    assert host.commit(B) is False
    assert read(host, slot, A) is None and len(host) == 0


def test_segment_unlinked_on_close(make_host):
    host = make_host(2)
    info = host.info
    path = SHM_DIR / info.shm_name
    assert path.exists()
    host.close()
    assert not path.exists()
    with pytest.raises(FileNotFoundError):
        HostTier.attach(info)


# ---- DiskTier --------------------------------------------------------------------------


def test_disk_round_trip_and_miss(tmp_path):
    disk = make_disk(tmp_path)
    assert disk.write(A, make_record(A)) == (True, [])
    assert disk.read(A) == make_record(A)
    assert disk.read(B) is None
    assert listing(tmp_path) == [f"{A:016x}.kv"]


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER.size + 10] ^= 0x80
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    os.truncate(path, HEADER.size + RECORD // 2)


def _swap_for_other_block(path: Path) -> None:  # B's file under A's name
    path.write_bytes(path.with_name(f"{B:016x}.kv").read_bytes())


def _flip_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(data)


def _append_byte(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize(
    "damage",
    [_flip_payload_byte, _truncate, _swap_for_other_block, _flip_magic, _append_byte, os.unlink],
)
def test_damaged_disk_block_is_a_miss_and_deleted(tmp_path, damage):
    disk = make_disk(tmp_path)
    disk.write(A, make_record(A))
    disk.write(B, make_record(B))
    damage(disk.file_of(A))
    assert disk.read(A) is None
    assert A not in disk and not disk.file_of(A).exists()
    assert disk.read(A) is None
    assert disk.read(B) == make_record(B)


def test_scan_after_restart_finds_good_blocks_only(tmp_path):
    disk = make_disk(tmp_path, num_files=8)
    for h in (A, B, C, D, E, F):
        disk.write(h, make_record(h))
    _truncate(disk.file_of(B))
    _swap_for_other_block(disk.file_of(C))  # holds B's header: wrong hash
    _flip_magic(disk.file_of(D))
    _flip_payload_byte(disk.file_of(E))  # the header is fine: found, then fails its read
    (tmp_path / f".{X:016x}.123.tmp").write_bytes(b"half a write")
    (tmp_path / "notes.txt").write_text("not the tier's")
    disk.close()
    (tmp_path / ".spare.123.4.tmp").write_bytes(b"")  # a spare left by a crash
    (tmp_path / ".spares" / "5").write_bytes(b"")  # one being made

    restarted = make_disk(tmp_path, num_files=8)
    assert len(restarted) == 3
    assert listing(tmp_path) == sorted(
        [f"{A:016x}.kv", f"{E:016x}.kv", f"{F:016x}.kv", "notes.txt"]
    )
    assert not (tmp_path / ".spare.123.4.tmp").exists()
    assert not (tmp_path / ".spares" / "5").exists()
    assert restarted.read(A) == make_record(A)
    assert restarted.read(F) == make_record(F)
    assert restarted.read(E) is None and not restarted.file_of(E).exists()
    assert [restarted.read(h) for h in (B, C, D)] == [None, None, None]


def test_scan_evicts_down_to_a_smaller_capacity(tmp_path):
    disk = make_disk(tmp_path, num_files=4)
    for h in (A, B, C):
        disk.write(h, make_record(h))
    os.utime(disk.file_of(A), ns=(1, 3_000_000_000))  # the oldest file: C, then B, then A
    os.utime(disk.file_of(B), ns=(1, 2_000_000_000))
    os.utime(disk.file_of(C), ns=(1, 1_000_000_000))
    disk.close()
    restarted = make_disk(tmp_path, num_files=2)
    assert (A in restarted, B in restarted, C in restarted) == (True, True, False)
    assert not disk.file_of(C).exists()


def test_disk_capacity_evicts_by_policy(tmp_path):
    disk = make_disk(tmp_path, num_files=3)
    for h in (A, B, C):
        disk.write(h, make_record(h))
    assert disk.read(A) == make_record(A)  # LRU: B is now the oldest
    assert disk.write(D, make_record(D)) == (True, [B])
    assert not disk.file_of(B).exists() and disk.read(B) is None
    assert disk.write(A, make_record(A)) == (True, [])  # held: touched, not rewritten
    assert disk.write(E, make_record(E), keep={C, D}) == (True, [A])
    assert disk.write(F, make_record(F), keep={C, D, E}) == (False, [])
    assert sorted(h for h in (A, B, C, D, E, F) if h in disk) == [C, D, E]


def test_full_disk_tier_writes_into_the_victims_file(tmp_path):
    disk = make_disk(tmp_path, num_files=2)
    disk.write(A, make_record(A))
    disk.write(B, make_record(B))
    inode = os.stat(disk.file_of(A)).st_ino
    assert disk.write(C, make_record(C)) == (True, [A])
    assert os.stat(disk.file_of(C)).st_ino == inode  # renamed and overwritten, not created
    assert not disk.file_of(A).exists()
    assert disk.read(C) == make_record(C) and disk.read(A) is None
    assert listing(tmp_path) == [f"{B:016x}.kv", f"{C:016x}.kv"]


def test_filling_disk_tier_writes_into_spares_made_ahead(tmp_path):
    disk = make_disk(tmp_path, num_files=3)
    wait_for_spares(disk, 3)  # no more than the tier has room for
    spares = {
        os.stat(tmp_path / name).st_ino: name
        for name in os.listdir(tmp_path)
        if name.startswith(".spare.")
    }
    assert len(spares) == 3
    disk.write(A, make_record(A))
    assert os.stat(disk.file_of(A)).st_ino in spares
    assert disk.read(A) == make_record(A)
    disk.close()
    assert listing(tmp_path) == [f"{A:016x}.kv"] and os.listdir(tmp_path / ".spares") == []
    assert not any(name.startswith(".spare.") for name in os.listdir(tmp_path))
    disk.write(B, make_record(B))  # closed: the file is created
    assert disk.read(B) == make_record(B)


def test_write_cut_short_stores_nothing_and_leaves_no_file(tmp_path, monkeypatch):
    disk = make_disk(tmp_path, num_files=1)
    disk.write(A, make_record(A))
    monkeypatch.setattr(disk_tier.os, "writev", lambda fd, buffers: os.write(fd, buffers[0]))
    assert disk.write(B, make_record(B)) == (False, [A])
    assert A not in disk and B not in disk
    assert listing(tmp_path) == []
    monkeypatch.undo()
    assert disk.write(B, make_record(B)) == (True, [])
    assert disk.read(B) == make_record(B)


@pytest.mark.parametrize("crash", ["victim renamed", "spare renamed", "header only"])
def test_write_interrupted_by_a_crash_is_a_miss_after_restart(tmp_path, crash):
    disk = make_disk(tmp_path, num_files=2)
    disk.write(A, make_record(A))
    disk.write(B, make_record(B))
    disk.close()
    path = disk.file_of(C)
    if crash == "victim renamed":  # A's file under C's name, not yet rewritten
        os.replace(disk.file_of(A), path)
    elif crash == "spare renamed":
        path.write_bytes(b"")
    else:  # C's header, A's payload
        header = HEADER.pack(disk_tier.MAGIC, disk_tier.VERSION, 0, C, RECORD, 12345)
        path.write_bytes(header + disk.file_of(A).read_bytes()[HEADER.size :])
    restarted = make_disk(tmp_path, num_files=2)
    assert restarted.read(C) is None and not path.exists()
    assert restarted.read(B) == make_record(B)


# ---- TieredStore -----------------------------------------------------------------------


def make_store(make_host, path: Path, host_slots: int, disk_files: int = 8) -> TieredStore:
    return TieredStore(make_host(host_slots), make_disk(path, disk_files))


def fill(store: TieredStore, *hashes: int) -> None:
    for h in hashes:
        assert store.put(h, make_record(h))


def read_hits(store: TieredStore, hits: list[Hit]) -> list[bytes | None]:
    return [read(store.host, hit.slot, hit.block_hash) for hit in hits]


def test_host_eviction_demotes_to_disk(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=2)
    fill(store, A, B, C)
    assert [store.tier_of(h) for h in (A, B, C, X)] == ["disk", "host", "host", None]
    assert store.disk.read(A) == make_record(A)
    assert store.take_events() == [
        BlockStored(block_hashes=[A, B], tier="host"),
        BlockRemoved(block_hashes=[A], tier="host"),
        BlockStored(block_hashes=[A], tier="disk"),
        BlockStored(block_hashes=[C], tier="host"),
    ]
    assert store.take_events() == []
    assert (store.stats["host"].offloaded, store.stats["host"].evicted) == (3, 1)
    assert store.stats["disk"].offloaded == 1
    assert store.reserve(A) is None and store.reserve(B) is None  # held: nothing to write


def test_disk_eviction_drops(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=1, disk_files=2)
    fill(store, A, B, C, D)
    assert [store.tier_of(h) for h in (A, B, C, D)] == [None, "disk", "disk", "host"]
    assert BlockRemoved(block_hashes=[A], tier="disk") in store.take_events()
    assert store.stats["disk"].evicted == 1


def test_leading_run_spans_tiers_and_stops_at_the_first_gap(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=3)
    fill(store, A, B, C, D)  # A demoted to disk; host holds B, C, D
    store.take_events()
    hits = store.get_leading([A, B, C, X, D])
    assert [(hit.block_hash, hit.tier) for hit in hits] == [(A, "disk"), (B, "host"), (C, "host")]
    assert read_hits(store, hits) == [make_record(h) for h in (A, B, C)]
    # A was promoted into the slot of D, the only block outside the run; A stays on disk
    assert [store.tier_of(h) for h in (A, B, C, D)] == ["host", "host", "host", "disk"]
    assert A in store.disk
    assert store.take_events() == [
        BlockRemoved(block_hashes=[D], tier="host"),
        BlockStored(block_hashes=[D], tier="disk"),
        BlockStored(block_hashes=[A], tier="host"),
    ]
    host, disk = store.stats["host"], store.stats["disk"]
    assert (host.lookups, host.hits, disk.lookups, disk.hits) == (5, 2, 3, 1)
    assert (host.hit_rate, disk.hit_rate) == (0.4, 1 / 3)


def test_corrupt_disk_block_breaks_the_run(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=4)
    fill(store, A, B, C, D, E, F)  # A, B on disk; C, D, E, F on host
    store.take_events()
    _flip_payload_byte(store.disk.file_of(B))
    hits = store.get_leading([A, B, C, D])
    assert [(hit.block_hash, hit.tier) for hit in hits] == [(A, "disk")]
    assert read_hits(store, hits) == [make_record(A)]
    assert store.tier_of(B) is None and not store.disk.file_of(B).exists()
    assert store.take_events() == [
        BlockRemoved(block_hashes=[E], tier="host"),
        BlockStored(block_hashes=[E], tier="disk"),
        BlockStored(block_hashes=[A], tier="host"),
        BlockRemoved(block_hashes=[B], tier="disk"),
    ]
    assert [store.tier_of(h) for h in (C, D, F)] == ["host", "host", "host"]


def test_run_longer_than_the_host_is_staged_a_window_at_a_time(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=2)
    fill(store, A, B, C, D)  # A, B on disk; C, D on host
    store.take_events()
    hits = store.get_leading([A, B, C, D, X])
    # the whole run, its first window (2 slots) staged: C and D, later in the run, made
    # room for it (demoted to disk, where the next window finds them)
    assert hits == [
        Hit(A, 0, "disk"),
        Hit(B, 1, "disk"),
        Hit(C, None, "host"),
        Hit(D, None, "host"),
    ]
    assert read_hits(store, hits[:2]) == [make_record(A), make_record(B)]
    assert [store.tier_of(h) for h in (A, B, C, D)] == ["host", "host", "disk", "disk"]
    host, disk = store.stats["host"], store.stats["disk"]
    assert (host.lookups, host.hits, disk.lookups, disk.hits) == (5, 2, 3, 2)
    # the worker read A and B: the next window evicts them (held on disk already)
    rest = store.stage([C, D])
    assert [(hit.block_hash, hit.tier) for hit in rest] == [(C, "disk"), (D, "disk")]
    assert read_hits(store, rest) == [make_record(C), make_record(D)]
    assert [store.tier_of(h) for h in (A, B, C, D)] == ["disk", "disk", "host", "host"]
    assert (host.lookups, host.hits, disk.lookups, disk.hits) == (5, 2, 3, 2)
    assert store.take_events() == [
        BlockRemoved(block_hashes=[C], tier="host"),
        BlockStored(block_hashes=[C], tier="disk"),
        BlockStored(block_hashes=[A], tier="host"),
        BlockRemoved(block_hashes=[D], tier="host"),
        BlockStored(block_hashes=[D], tier="disk"),
        BlockStored(block_hashes=[B], tier="host"),
        BlockRemoved(block_hashes=[A], tier="host"),
        BlockStored(block_hashes=[C], tier="host"),
        BlockRemoved(block_hashes=[B], tier="host"),
        BlockStored(block_hashes=[D], tier="host"),
    ]


def test_a_block_gone_before_its_window_is_staged_ends_the_run(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=2)
    fill(store, A, B, C, D, E, F)  # A-D on disk; E, F on host
    hits = store.get_leading([A, B, C, D])
    assert [hit.slot is None for hit in hits] == [False, False, True, True]
    _flip_payload_byte(store.disk.file_of(D))
    store.take_events()
    rest = store.stage([C, D])
    assert [(hit.block_hash, hit.tier) for hit in rest] == [(C, "disk")]
    assert read_hits(store, rest) == [make_record(C)]
    assert store.tier_of(D) is None and not store.disk.file_of(D).exists()
    assert BlockRemoved(block_hashes=[D], tier="disk") in store.take_events()


def test_staging_a_window_keeps_the_rest_of_the_run_on_disk(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=2, disk_files=4)
    fill(store, A, B, C, D, E, F)  # A-D on disk (full); E, F on host, on no disk
    hits = store.get_leading([A, B, C, D])
    assert [(hit.block_hash, hit.slot is None) for hit in hits] == [
        (A, False),
        (B, False),
        (C, True),
        (D, True),
    ]
    # promoting A and B evicted E and F from host; the disk had no room for them but
    # C's and D's files, the run's next window: E and F are dropped, C and D stay
    assert [store.tier_of(h) for h in (A, B, C, D, E, F)] == [
        "host",
        "host",
        "disk",
        "disk",
        None,
        None,
    ]
    assert read_hits(store, store.stage([C, D])) == [make_record(C), make_record(D)]


def test_reserve_and_promotion_never_evict_kept_blocks(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=2)
    fill(store, A, B, C)  # A on disk; B, C on host
    assert store.reserve(D, keep=frozenset({B, C})) is None  # every slot kept
    assert store.get_leading([A], keep={B, C}) == [Hit(A, None, "disk")]  # held, no slot
    slot = store.reserve(D, keep=frozenset({B}))  # C goes, though B is older
    assert [store.tier_of(h) for h in (B, C)] == ["host", "disk"]
    store.host.write(slot, D, make_record(D))
    assert store.commit(D)
    hits = store.get_leading([A], keep={B})  # D goes, though B is older
    assert [(hit.block_hash, hit.tier) for hit in hits] == [(A, "disk")]
    assert [store.tier_of(h) for h in (B, D)] == ["host", "disk"]


def test_clear_forgets_every_tier(make_host, tmp_path):
    store = make_store(make_host, tmp_path, host_slots=2)
    fill(store, A, B, C)
    slot = store.reserve(D)  # a worker is writing D meanwhile
    store.take_events()
    store.clear()
    assert store.take_events() == [AllBlocksCleared(tier="host"), AllBlocksCleared(tier="disk")]
    store.host.write(slot, D, make_record(D))
    assert store.commit(D) is False
    assert store.get_leading([A, B, C, D]) == []
    assert listing(tmp_path) == []


# ---- with the packing kernels: what a worker does ---------------------------------------


def test_worker_packs_into_a_slot_and_unpacks_from_it(make_host):
    torch = pytest.importorskip("torch")
    from kvmesh.gpu.kv_pack import pack_blocks, unpack_blocks

    shape = (2, 4, 2, 1, 8)  # [2, num_blocks, block_size, num_kv_heads, head_dim], 2 layers
    src = [torch.randn(shape, dtype=torch.bfloat16) for _ in range(2)]
    dst = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(2)]
    record_bytes = 2 * 2 * 2 * 1 * 8 * 2  # layers * K/V * block_size * heads * dim * bf16
    host = HostTier.create(segment_name("test-cache"), record_bytes, 8192)
    try:
        slot, _ = host.allocate(A)
        with host.writing(slot, A) as payload:  # offload device block 1: packed in place
            pack_blocks(src, [1], out=torch.from_numpy(payload))
        assert host.commit(A)
        staging = torch.empty(record_bytes, dtype=torch.uint8)  # onboard into device block 3
        assert host.read_into(slot, A, staging.numpy())
        unpack_blocks(staging, dst, [3])
    finally:
        host.close()
    for layer in range(2):
        assert torch.equal(dst[layer][:, 3], src[layer][:, 1])
        assert not dst[layer][:, :3].any()


@pytest.mark.parametrize("layout", ["one tensor per layer", "one allocation"])
@pytest.mark.parametrize(("packed_ids", "block_ids"), [([4, 0, 2], [1, 5, 3]), ([4], [1])])
def test_records_packed_one_by_one_unpack_in_one_call(layout, packed_ids, block_ids):
    torch = pytest.importorskip("torch")
    from kvmesh.gpu.kv_pack import pack_blocks, unpack_records

    shape = (2, 6, 2, 1, 8)  # [2, num_blocks, block_size, num_kv_heads, head_dim], 3 layers
    if layout == "one allocation":
        src, dst = list(torch.randn(3, *shape).unbind(0)), list(torch.zeros(3, *shape).unbind(0))
    else:
        src, dst = [torch.randn(shape) for _ in range(3)], [torch.zeros(shape) for _ in range(3)]
    records = torch.cat([pack_blocks(src, [b]).view(-1).view(torch.uint8) for b in packed_ids])
    unpack_records(records, dst, block_ids)
    untouched = [b for b in range(6) if b not in block_ids]
    for layer in range(3):
        assert torch.equal(dst[layer][:, block_ids], src[layer][:, packed_ids])
        assert not dst[layer][:, untouched].any()
