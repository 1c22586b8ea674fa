"""Named POSIX shared-memory segments: what every same-host sharing in kvmesh maps (a
worker's KV pool for the shm data plane, the cache actor's host tier). numpy only, so a
process that maps or cleans up segments but runs no model (the cache actor, the launcher)
never imports torch.

    /dev/shm/kvmesh-<actor>-<pid>-<random>:   [magic|token][ pool ... ]
                                              0            HEADER_BYTES

The token is random per segment and travels with the name: an attacher checks it, so a
same-named segment in another host's (or container's) /dev/shm is never taken for the
peer's. The owner unlinks on close; if it dies without closing (SIGKILL), the
multiprocessing resource tracker unlinks the name (see unlink_segments_of). A mapping
stays valid after unlink, so a peer attached to a dead owner never faults. Space is
reserved at create (posix_fallocate): a full /dev/shm is a clear error then, not a SIGBUS
on the first write into a hole.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
MAGIC = b"kvmesh-kv-pool\x00\x01"
TOKEN_BYTES = 16
HEADER_BYTES = 4096  # keeps the pool page-aligned
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def available() -> bool:
    """Whether this host has POSIX shared memory at SHM_DIR (Linux)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def segment_name(actor_id: str) -> str:
    """A fresh name for actor_id's segment: unique per process and per call."""
    return f"kvmesh-{_UNSAFE.sub('_', actor_id)[:64]}-{os.getpid()}-{secrets.token_hex(4)}"


def unlink_segments_of(pid: int) -> list[str]:
    """Unlink the segments a dead process `pid` created; returns their names. For a
    supervisor that started actors with multiprocessing: they share its resource
    tracker, which cleans up only once every process sharing it has exited."""
    names = []
    for path in SHM_DIR.glob(f"kvmesh-*-{pid}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            names.append(path.name)
    return names


class SharedSegment:
    """One mapped shared-memory segment: `pool` is the flat uint8 numpy view after the
    header (torch.from_numpy(pool) shares it).

    `create` makes and owns it (unlinked on close, or by the resource tracker on crash);
    `attach` maps a peer's, checking its token.
    """

    def __init__(self, name: str, mapping: mmap.mmap, token: bytes, owner: bool) -> None:
        self.name = name
        self.token = token
        self.owner = owner
        self._mapping = mapping
        self.pool = np.frombuffer(mapping, dtype=np.uint8, offset=HEADER_BYTES)

    @classmethod
    def create(cls, name: str, pool_bytes: int, *, populate: bool = True) -> SharedSegment:
        """A new segment holding pool_bytes of zeros, space reserved up front. populate:
        map every page now (see _map); False leaves this process's page tables to fill
        as pages are touched (a large tier that one process barely touches)."""
        path = SHM_DIR / name
        size = HEADER_BYTES + pool_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _track(name)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
                raise MemoryError(
                    f"cannot reserve {size} bytes of shared memory in {SHM_DIR} for the KV "
                    f"pool ({free} free): enlarge {SHM_DIR} (docker --shm-size) or set the "
                    "data plane backend to 'zmq'"
                ) from None
            mapping = _map(fd, size, populate)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        os.close(fd)
        token = secrets.token_bytes(TOKEN_BYTES)
        mapping[: len(MAGIC) + TOKEN_BYTES] = MAGIC + token
        return cls(name, mapping, token, owner=True)

    @classmethod
    def attach(
        cls, name: str, token: bytes, pool_bytes: int, *, populate: bool = True
    ) -> SharedSegment:
        """Map a peer's segment. Raises FileNotFoundError when this host has no segment
        of that name, ValueError when it is not the peer's (token) or not of pool_bytes."""
        if not name or "/" in name:
            raise ValueError(f"shm_name must be a plain segment name, got {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size != HEADER_BYTES + pool_bytes:
                raise ValueError(
                    f"shm segment {name!r} holds {size - HEADER_BYTES} pool bytes; the peer's "
                    f"KvPoolInfo describes {pool_bytes}"
                )
            mapping = _map(fd, size, populate)
        finally:
            os.close(fd)
        if mapping[: len(MAGIC) + TOKEN_BYTES] != MAGIC + token:
            mapping.close()
            raise ValueError(f"shm segment {name!r} is not the peer's pool (token differs)")
        return cls(name, mapping, token, owner=False)

    def close(self) -> None:
        """Unlink (owner) and unmap. Arrays still viewing the pool keep the mapping
        alive until they go; the name is gone at once. Closing twice is harmless."""
        if self.owner and self.name is not None:
            _unlink(self.name)
        self.name = None
        self.pool = None
        try:
            self._mapping.close()
        except BufferError:
            pass  # views of the pool are alive; the mapping goes with the last of them


def _map(fd: int, size: int, populate: bool = True) -> mmap.mmap:
    # MAP_POPULATE: the page tables are built now, not by faults in the first transfer.
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _track(name: str) -> None:
    resource_tracker.register(f"/{name}", "shared_memory")


def _unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass
    resource_tracker.unregister(f"/{name}", "shared_memory")
