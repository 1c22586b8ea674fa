"""KV blocks over ZeroMQ: a packed chunk rides as the one extra frame of its KvWrite on
the control connection, sent with copy=False from a staging buffer that is reused only
once ZeroMQ has let go of it (MessageTracker). The receiver unpacks straight from the
received frame. The fallback between hosts when ucxx is not installed, and the backend
that always works.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import zmq

from kvmesh.protocol import KvWrite

ALIGN = 16  # bytes; every KV dtype's element size divides it


class ZmqLink:
    """Writes to one peer: packed chunks as tracked zero-copy frames."""

    backend = "zmq"
    chunked = True

    def __init__(self, channel, peer: str) -> None:
        self.channel = channel
        self.peer = peer

    async def send_packed(self, msg: KvWrite, lease, timeout: float) -> None:
        """Send msg with lease.view as its frame; return once the peer answered KvWriteDone."""
        frame = zmq.Frame(lease.view.numpy(), copy=False, track=True)
        # Hold the tracker, not the Frame: a live Frame keeps its message, so the
        # tracker would never be done.
        tracker = frame.tracker
        lease.reusable = lambda: tracker.done
        frames = [frame]
        del frame
        await self.channel.request(self.peer, msg, timeout, frames=frames)

    def close(self, peer_dead: bool) -> None:
        pass


def frame_bytes(frames: list, nbytes: int) -> torch.Tensor:
    """The one extra frame of a zmq KvWrite as a flat uint8 tensor of exactly nbytes."""
    if len(frames) != 1:
        raise ValueError(f"a zmq KvWrite carries exactly 1 extra frame, got {len(frames)}")
    buffer = frames[0].buffer
    if buffer.nbytes != nbytes:
        raise ValueError(f"the KvWrite frame holds {buffer.nbytes} bytes, expected {nbytes}")
    with warnings.catch_warnings():  # read-only frame memory: unpacking only reads it
        warnings.simplefilter("ignore", UserWarning)
        packed = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
    # ZeroMQ decodes small messages into one shared receive buffer, at any offset: such a
    # frame is copied to aligned memory (large ones have their own, aligned, allocation).
    return packed if packed.data_ptr() % ALIGN == 0 else packed.clone()
