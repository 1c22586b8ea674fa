"""Packing buffers kept for reuse by the zmq and ucx backends: a fresh buffer per chunk
would fault its pages in on every transfer."""

from __future__ import annotations

import torch

WINDOW = 3  # chunks of one write in flight at most


class Lease:
    """A staging buffer taken for one chunk: `view` holds its nbytes."""

    def __init__(self, buffer: torch.Tensor, nbytes: int) -> None:
        self.buffer = buffer
        self.nbytes = nbytes
        self.view = buffer[:nbytes]
        self.reusable = lambda: True  # the backend replaces it: e.g. ZeroMQ let go of it
        self.never = False

    def never_reuse(self) -> None:
        """Some transfer may still touch the buffer (cancelled mid-way): drop it."""
        self.never = True


class Staging:
    """Packing buffers kept for reuse, so a transfer does not fault in fresh pages."""

    def __init__(self, keep: int = WINDOW + 1, pin: bool = False) -> None:
        self.keep = keep
        self.pin = pin  # page-locked, for copies from and to a GPU
        self._free: list[Lease] = []

    def take(self, nbytes: int) -> Lease:
        for i, lease in enumerate(self._free):
            if lease.buffer.numel() >= nbytes and lease.reusable():
                del self._free[i]
                return Lease(lease.buffer, nbytes)
        return Lease(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin), nbytes)

    def give(self, lease: Lease) -> None:
        """Return a lease; it is handed out again once reusable() (never, if never_reuse)."""
        if not lease.never:
            self._free = [*self._free, lease][-self.keep :]
