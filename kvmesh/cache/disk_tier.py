"""The disk tier: one file per KV block record in a directory the tier owns alone.

    <dir>/<hash:016x>.kv      header (HEADER, 40 bytes, little-endian), then the record
        magic "KVMBLOCK" | version u32 | 0 u32 | block hash u64 | length u64 | XXH3-64 u64

A write avoids creating a file on the caller's path: creating one (a new inode) costs
tens of us to ~1 ms of kernel time (ext4 here; the more, the more files were deleted
lately), overwriting one in place ~10 us. The file a write fills, renamed to the block's
name, is the first of:

    1. the file of the block evicted to make room (the steady state: a full tier)
    2. a spare: an empty file a helper thread (nice 19) makes ahead (in <dir>/.spares,
       then moved to <dir>/.spare.<pid>.<n>.tmp), SPARE_FILES at most and no more than
       the tier has room for (a tier still filling up)
    3. a new file, created there and then (no spare left, or the helper failed)

then header and record are written in place with one writev, no temp file. A write in
progress is never read: one thread owns the tier (the helper only creates spares, it
never touches the index or a block's file). A write cut short by a crash leaves a file
whose header names another block (a victim's, renamed), a short file (a spare) or a
payload that fails its checksum: each a miss, like any corruption. There is no fsync:
after a power cut a file may be short or hold zeros, and the checks below turn that into
a miss too, which is cheaper than syncing every block.

A read checks everything: magic, version, the hash (a file renamed or copied under
another block's name), the length, the file's size and the payload's checksum. Any
mismatch, a missing file included, is a miss; the file is deleted and forgotten, so a
corrupt block never comes back as output and is recomputed instead.

Trust. The directory is this user's alone (0700, not a symlink, not another user's:
kvmesh.transport.private_dir), files are 0600 and opened without following symlinks,
and one process holds it at a time (flock on <dir>/.lock): a second cluster on the same
kv.disk_path fails at start, naming the holder's pid. <dir>/manifest.json names the model
fingerprint (ModelConfig.fingerprint: config, weights, KV dtype, block size, format) the
blocks were computed under; a tier opened under another fingerprint, or holding blocks
without a manifest, deletes them first (logged), so KV of another model, dtype or block
size is never served. (Block hashes are salted with the same fingerprint besides.)

Capacity is a number of files (kv.disk_gb // file size), evicted by the tier's policy.
Opening a tier scans its directory: leftover temp files (spares included, and whatever
is in .spares) are deleted, files with a bad header or size are deleted, the rest are
indexed oldest-modified first. The scan reads only headers; payload checksums are checked
on every read.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import struct
import threading
from collections import deque
from collections.abc import Container, Iterator
from pathlib import Path

import numpy as np
import structlog
import xxhash

from kvmesh.cache.eviction import make_policy
from kvmesh.cache.host_tier import as_bytes
from kvmesh.transport.private_dir import private_dir

log = structlog.get_logger(__name__)

MAGIC = b"KVMBLOCK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")  # magic, version, reserved, hash, length, checksum
SUFFIX = ".kv"
MANIFEST = "manifest.json"
LOCK = ".lock"
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
TMP_SUFFIX = ".tmp"
SPARE_FILES = 64  # empty files made ahead, for a burst of writes into a tier not yet full
SPARE_NICE = 19  # the spare-making thread's nice value: it runs when the CPUs are idle


class DiskTier:
    """Block records as checksummed files under `path`; at most `num_files` of them.

    Not safe to share between processes: one cache actor owns the directory.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        record_bytes: int,
        capacity_bytes: int,
        policy: str = "lru",
        fingerprint: str = "",
    ) -> None:
        if record_bytes < 1:
            raise ValueError(f"record_bytes must be >= 1, got {record_bytes}")
        self.path = Path(path)
        self.record_bytes = record_bytes
        self.file_bytes = HEADER.size + record_bytes
        self.num_files = capacity_bytes // self.file_bytes
        if self.num_files < 1:
            raise ValueError(
                f"a disk tier of {capacity_bytes} bytes (kv.disk_gb) holds no block file of "
                f"{self.file_bytes} bytes"
            )
        self._policy_name = policy
        self._policy = make_policy(policy)
        self.path = private_dir(self.path, "kv.disk_path")
        self._lock_fd = lock(self.path)
        try:
            self.fingerprint = fingerprint
            self._check_manifest()
            self.scan()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.spares = SpareFiles(self.path)
        self._want_spares()

    def __len__(self) -> int:
        return len(self._policy)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._policy

    def __iter__(self) -> Iterator[int]:
        """The hashes of the blocks held."""
        return iter(list(self._policy))

    def file_of(self, block_hash: int) -> Path:
        return self.path / f"{block_hash:016x}{SUFFIX}"

    def victim(self, keep: Container[int] = ()) -> int | None:
        """The block a write into the full tier would evict now (never one in `keep`)."""
        return self._policy.victim(keep)

    def touch(self, block_hash: int) -> None:
        """Count a use of a held block without reading it (e.g. it left the host tier)."""
        self._policy.touch(block_hash)

    def write(self, block_hash: int, payload, keep: Container[int] = ()) -> tuple[bool, list[int]]:
        """Store one block record; evicts (never a block in `keep`) to make room.

        Returns (stored, evicted hashes). Not stored when every held block is kept or the
        write failed (disk full, I/O error: logged). A block already held is touched.
        """
        src = as_bytes(payload, "payload")
        if src.size != self.record_bytes:
            raise ValueError(f"payload holds {src.size} bytes, a block record {self.record_bytes}")
        if block_hash in self._policy:
            self._policy.touch(block_hash)
            return True, []
        evicted = []  # out of the index; their files are reused or deleted below
        while len(self._policy) >= self.num_files:
            victim = self._policy.victim(keep)
            if victim is None:
                for block in evicted:
                    _unlink(self.file_of(block))
                return False, evicted
            self._policy.remove(victim)
            evicted.append(victim)
        stored = self._store(block_hash, src, evicted)
        if stored:
            self._policy.insert(block_hash)
        self._want_spares()
        return stored, evicted

    def read_into(self, block_hash: int, out) -> bool:
        """Copy block_hash's record into out (record_bytes, writable) and touch it. False
        on a miss: not held, or its file is missing or fails a check (then deleted)."""
        dst = as_bytes(out, "out")
        if block_hash not in self._policy:
            return False
        if dst.size != self.record_bytes:
            raise ValueError(f"out holds {dst.size} bytes, a block record {self.record_bytes}")
        try:
            with open(self.file_of(block_hash), "rb", buffering=0, opener=_nofollow) as f:
                header = f.read(HEADER.size)
                ok = (
                    self._header_ok(header, block_hash)
                    and _read_full(f, dst) == dst.size
                    and f.read(1) == b""
                    and xxhash.xxh3_64_intdigest(dst) == HEADER.unpack(header)[5]
                )
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("disk_tier_read_failed", block_hash=block_hash, error=str(exc))
            ok = False
        if not ok:
            self._discard(block_hash)
            return False
        self._policy.touch(block_hash)
        return True

    def read(self, block_hash: int) -> bytearray | None:
        """block_hash's record, or None on a miss (see read_into)."""
        out = bytearray(self.record_bytes)
        return out if self.read_into(block_hash, out) else None

    def remove(self, block_hash: int) -> bool:
        """Delete a held block's file; False if not held."""
        if block_hash not in self._policy:
            return False
        self._discard(block_hash)
        return True

    def clear(self) -> list[int]:
        """Delete every held block (e.g. new weights) and return their hashes."""
        dropped = list(self._policy)
        for block_hash in dropped:
            self._discard(block_hash)
        self._want_spares()
        return dropped

    def close(self) -> None:
        """Stop the spare-making thread and delete the spares (block files stay), and
        let the directory go (its lock). Closing twice is harmless."""
        self.spares.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_manifest(self) -> None:
        """Blocks of another fingerprint (or of none recorded) are deleted, then this
        tier's fingerprint is recorded."""
        manifest = self.path / MANIFEST
        try:
            with open(manifest, "rb", opener=_nofollow) as f:
                recorded = json.loads(f.read()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != self.fingerprint:
            stale = [e.path for e in os.scandir(self.path) if hash_of_name(e.name) is not None]
            if stale:
                log.warning(
                    "disk_tier_stale_blocks_deleted",
                    path=str(self.path),
                    blocks=len(stale),
                    recorded=recorded,
                    fingerprint=self.fingerprint,
                )
            for file in stale:
                _unlink(file)
            fd = os.open(manifest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"fingerprint": self.fingerprint, "format": VERSION}, f)

    def scan(self) -> int:
        """Rebuild the index from the directory (see the module doc); blocks found."""
        self._policy = make_policy(self._policy_name)
        found = []
        for entry in os.scandir(self.path):
            name = entry.name
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                _unlink(entry.path)
                continue
            block_hash = hash_of_name(name)
            if block_hash is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                with open(entry.path, "rb", opener=_nofollow) as f:
                    header = f.read(HEADER.size)
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                header, stat = b"", None
            if (
                stat is None
                or stat.st_size != self.file_bytes
                or not self._header_ok(header, block_hash)
            ):
                _unlink(entry.path)
                continue
            found.append((stat.st_mtime_ns, name, block_hash))
        found.sort()
        for _, _, block_hash in found:
            self._policy.insert(block_hash)
        while len(self._policy) > self.num_files:  # the tier shrank since
            self._discard(self._policy.victim())
        return len(self._policy)

    def _header_ok(self, header: bytes, block_hash: int) -> bool:
        if len(header) != HEADER.size:
            return False
        magic, version, _, stored_hash, length, _ = HEADER.unpack(header)
        return (
            magic == MAGIC
            and version == VERSION
            and stored_hash == block_hash
            and length == self.record_bytes
        )

    def _discard(self, block_hash: int) -> None:
        self._policy.remove(block_hash)
        _unlink(self.file_of(block_hash))

    def _store(self, block_hash: int, src: np.ndarray, evicted: list[int]) -> bool:
        """Write block_hash's file into a reused file if one is at hand (see the module
        doc): an evicted block's (the others' are deleted), else a spare, else a new one."""
        path = self.file_of(block_hash)
        header = HEADER.pack(MAGIC, VERSION, 0, block_hash, src.size, xxhash.xxh3_64_intdigest(src))
        try:
            claimed = False
            for victim in evicted:
                if claimed:
                    _unlink(self.file_of(victim))
                else:
                    claimed = _rename(self.file_of(victim), path)
            while not claimed and (spare := self.spares.take()) is not None:
                claimed = _rename(spare, path)  # False: a scan() deleted it meanwhile
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | NOFOLLOW, 0o600)  # new if unclaimed
            try:
                written = os.writev(fd, [header, memoryview(src)])
            finally:
                os.close(fd)
            if written != self.file_bytes:
                raise OSError(f"wrote {written} of {self.file_bytes} bytes")
        except OSError as exc:
            log.warning("disk_tier_write_failed", path=str(path), error=str(exc))
            _unlink(path)
            return False
        return True

    def _want_spares(self) -> None:
        self.spares.want(min(SPARE_FILES, self.num_files - len(self._policy)))


class SpareFiles:
    """Empty files in `path`, made ahead by a daemon thread so that a write into a tier
    not yet full renames one instead of creating it (see the module doc). The owner asks
    for a stock (`want`) and `take`s them; the thread only ever creates files, and stops
    for good at its first failure (the owner's writes then create their own files).

    A create holds its directory's lock for all its ~0.5 ms, and a rename in that
    directory waits for it, so spares are created in <path>/.spares and then renamed,
    which is quick, to <path>/.spare.<pid>.<n>.tmp, ready.
    """

    _ids = itertools.count()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.workdir = path / ".spares"
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        for leftover in os.scandir(self.workdir):  # a crash's half-made spare
            _unlink(leftover.path)
        self._ready: deque[str] = deque()  # made, not taken: thread-safe append/popleft
        self._stock = 0
        self._wanted = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._make, name="disk-tier-spares", daemon=True)
        self._thread.start()

    def want(self, stock: int) -> None:
        """Keep `stock` spares ready (those ready beyond it stay until taken)."""
        self._stock = stock
        if len(self._ready) < stock:
            self._wanted.set()

    def __len__(self) -> int:
        """Spares ready."""
        return len(self._ready)

    def take(self) -> str | None:
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def close(self) -> None:
        self._closed = True
        self._wanted.set()
        self._thread.join()
        while (spare := self.take()) is not None:
            _unlink(spare)

    def _make(self) -> None:
        # Spares are work ahead of need, with a fallback: never take CPU from serving
        # (Linux: a thread's own nice value; elsewhere it runs at the process's).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SPARE_NICE)
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while not self._closed and len(self._ready) < self._stock:
                n = next(self._ids)
                made = self.workdir / str(n)
                spare = self.path / f".spare.{os.getpid()}.{n}{TMP_SUFFIX}"
                try:
                    os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600))
                    os.replace(made, spare)
                except OSError as exc:
                    log.warning("disk_tier_spares_stopped", path=str(made), error=str(exc))
                    _unlink(made)
                    return
                self._ready.append(str(spare))


def lock(path: Path) -> int:
    """An exclusive flock on <path>/.lock, held by the returned fd; a held one is an
    error naming its holder (its pid is in the file)."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(
            f"kv.disk_path: the disk tier {str(path)!r} is in use by another "
            f"process (pid {holder}); two clusters cannot share one tier "
            "directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _nofollow(path, flags: int) -> int:
    return os.open(path, flags | NOFOLLOW)


def hash_of_name(name: str) -> int | None:
    """The block hash a file (or object) name stands for, None for a name the disk (or
    object) tier never writes."""
    stem, suffix = name[: -len(SUFFIX)], name[-len(SUFFIX) :]
    if suffix != SUFFIX or len(stem) != 16:
        return None
    try:
        block_hash = int(stem, 16)
    except ValueError:
        return None
    return block_hash if f"{block_hash:016x}" == stem else None


def _read_full(f, dst: np.ndarray) -> int:
    """Read into dst until it is full or the file ends; bytes read."""
    view = memoryview(dst)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _rename(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """os.replace; False when src does not exist."""
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        return False
    return True


def _unlink(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
