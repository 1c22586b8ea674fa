"""The disk tier: one file per KV block record in a directory the tier owns alone.

    <dir>/<hash:016x>.kv      header (HEADER, 40 bytes, little-endian), then the record
        magic "KVMBLOCK" | version u32 | 0 u32 | block hash u64 | length u64 | XXH3-64 u64

A write goes to <dir>/.<hash:016x>.<pid>.tmp and is renamed over the final name
(os.replace), so a reader sees the old file or the new one, never half of one. There is
no fsync: after a power cut a file may be short or hold zeros, and the checks below turn
that into a miss like any other corruption, which is cheaper than syncing every block.

A read checks everything: magic, version, the hash (a file renamed or copied under
another block's name), the length, the file's size and the payload's checksum. Any
mismatch, a missing file included, is a miss; the file is deleted and forgotten, so a
corrupt block never comes back as output and is recomputed instead.

Capacity is a number of files (kv.disk_gb // file size), evicted by the tier's policy.
Opening a tier scans its directory: leftover temp files are deleted, files with a bad
header or size are deleted, the rest are indexed oldest-modified first. The scan reads
only headers; payload checksums are checked on every read.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Container
from pathlib import Path

import numpy as np
import structlog
import xxhash

from kvmesh.cache.eviction import make_policy
from kvmesh.cache.host_tier import as_bytes

log = structlog.get_logger(__name__)

MAGIC = b"KVMBLOCK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")  # magic, version, reserved, hash, length, checksum
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"


class DiskTier:
    """Block records as checksummed files under `path`; at most `num_files` of them.

    Not safe to share between processes: one cache actor owns the directory.
    """

    def __init__(self, path: str | os.PathLike, record_bytes: int, capacity_bytes: int,
                 policy: str = "lru") -> None:
        if record_bytes < 1:
            raise ValueError(f"record_bytes must be >= 1, got {record_bytes}")
        self.path = Path(path)
        self.record_bytes = record_bytes
        self.file_bytes = HEADER.size + record_bytes
        self.num_files = capacity_bytes // self.file_bytes
        if self.num_files < 1:
            raise ValueError(
                f"a disk tier of {capacity_bytes} bytes (kv.disk_gb) holds no block file of "
                f"{self.file_bytes} bytes")
        self._policy_name = policy
        self._policy = make_policy(policy)
        self.path.mkdir(parents=True, exist_ok=True)
        self.scan()

    def __len__(self) -> int:
        return len(self._policy)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._policy

    def file_of(self, block_hash: int) -> Path:
        return self.path / f"{block_hash:016x}{SUFFIX}"

    def touch(self, block_hash: int) -> None:
        """Count a use of a held block without reading it (e.g. it left the host tier)."""
        self._policy.touch(block_hash)

    def write(self, block_hash: int, payload,
              keep: Container[int] = ()) -> tuple[bool, list[int]]:
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
        evicted = []
        while len(self._policy) >= self.num_files:
            victim = self._policy.victim(keep)
            if victim is None:
                return False, evicted
            self._discard(victim)
            evicted.append(victim)
        tmp = self.path / f".{block_hash:016x}.{os.getpid()}{TMP_SUFFIX}"
        header = HEADER.pack(MAGIC, VERSION, 0, block_hash, src.size,
                             xxhash.xxh3_64_intdigest(src))
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(memoryview(src))
            os.replace(tmp, self.file_of(block_hash))
        except OSError as exc:
            log.warning("disk_tier_write_failed", path=str(tmp), error=str(exc))
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False, evicted
        self._policy.insert(block_hash)
        return True, evicted

    def read_into(self, block_hash: int, out) -> bool:
        """Copy block_hash's record into out (record_bytes, writable) and touch it. False
        on a miss: not held, or its file is missing or fails a check (then deleted)."""
        dst = as_bytes(out, "out")
        if block_hash not in self._policy:
            return False
        if dst.size != self.record_bytes:
            raise ValueError(f"out holds {dst.size} bytes, a block record {self.record_bytes}")
        try:
            with open(self.file_of(block_hash), "rb", buffering=0) as f:
                header = f.read(HEADER.size)
                ok = (self._header_ok(header, block_hash)
                      and _read_full(f, dst) == dst.size and f.read(1) == b""
                      and xxhash.xxh3_64_intdigest(dst) == HEADER.unpack(header)[5])
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
        return dropped

    def scan(self) -> int:
        """Rebuild the index from the directory (see the module doc); blocks found."""
        self._policy = make_policy(self._policy_name)
        found = []
        for entry in os.scandir(self.path):
            name = entry.name
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                _unlink(entry.path)
                continue
            block_hash = _hash_of(name)
            if block_hash is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                with open(entry.path, "rb") as f:
                    header = f.read(HEADER.size)
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                header, stat = b"", None
            if (stat is None or stat.st_size != self.file_bytes
                    or not self._header_ok(header, block_hash)):
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
        return (magic == MAGIC and version == VERSION and stored_hash == block_hash
                and length == self.record_bytes)

    def _discard(self, block_hash: int) -> None:
        self._policy.remove(block_hash)
        _unlink(self.file_of(block_hash))


def _hash_of(name: str) -> int | None:
    """The block hash a file name stands for, None for a name the tier never writes."""
    stem, suffix = name[:-len(SUFFIX)], name[-len(SUFFIX):]
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


def _unlink(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
