"""Every wire message of kvmesh, in one place.

Messages are frozen msgspec Structs tagged by class name and encoded as MessagePack.
Bulk tensors never travel inside a message. Plain data: anything may import this
module, and it must never import torch.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every wire message; the tag is the class name."""


# --- KV events: what a worker's (or the cache actor's) block pool stored or dropped ---

TIERS = ("device", "host", "disk")


class BlockStored(Message, frozen=True):
    """Full blocks entered a pool's prefix cache, in chain order.

    block_hashes[0]'s parent is parent_hash (None for the first block of a sequence).
    """

    block_hashes: list[int]
    parent_hash: int | None = None
    tier: str = "device"


class BlockRemoved(Message, frozen=True):
    """Blocks left a pool's prefix cache (evicted or overwritten)."""

    block_hashes: list[int]
    tier: str = "device"


class AllBlocksCleared(Message, frozen=True):
    """The pool dropped its whole prefix cache."""

    tier: str = "device"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
