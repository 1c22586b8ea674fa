"""vLLM's KV-cache events as kvmesh KVEvents, keyed by kvmesh's block hashes.

vLLM (kv_events_config, the ZeroMQ publisher) names a block by its own hash, which
neither the frontend nor the router can compute. Its BlockStored carries what kvmesh's
hash needs, though: the blocks' token ids, their parent's (vLLM) hash and the block
size. So the translator keeps, per block vLLM holds, vLLM hash -> (kvmesh hash, salt),
and names each stored block by the chain kvmesh.kv.block_hash computes over the same
token ids from the parent's kvmesh hash:

    vLLM   BlockStored(hashes=[v1, v2], parent=v0, token_ids=[t0 .. t63], block_size=32)
    here   k1, k2 = hash_blocks(t0 .. t63, 32, parent=known[v0].hash, salt=known[v0].salt)
           known[v1], known[v2] = (k1, salt), (k2, salt)
    router BlockStored(block_hashes=[wire(k1), wire(k2)], parent_hash=wire(k0))

A chain's first block (parent None) takes the model's salt plus the request's
cache_salt, which vLLM lists in that block's extra_keys (as kvmesh's
SamplingParams.salted does). A block whose parent this side never saw, or whose block
size differs from the cluster's, is not indexed: the router then under-predicts hits,
which costs speed, never correctness. Torch-free and vLLM-free (it decodes the msgpack
itself), so tests feed it the publisher's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import structlog

from kvmesh.kv.block_hash import hash_blocks, wire_hash
from kvmesh.params import SamplingParams
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

log = structlog.get_logger(__name__)

DEVICE_MEDIA = (None, "GPU")  # vLLM's device pool (its CPU backend calls its pool GPU too)


@dataclass(frozen=True)
class KnownBlock:
    block_hash: int  # kvmesh's, full width
    salt: bytes


class BlockSizeMismatch(ValueError):
    """vLLM's blocks are not the cluster's: every hash would miss."""


class VllmEventTranslator:
    """Turns vLLM event batches (the publisher's payload frames) into kvmesh KVEvents."""

    def __init__(self, block_size: int, salt: bytes) -> None:
        self.block_size = block_size
        self.salt = salt
        self.known: dict[int, KnownBlock] = {}  # vLLM block hash -> kvmesh's
        self.num_dropped = 0  # stored blocks not indexed (unknown parent)

    def translate(self, payload: bytes) -> list[KVEvent]:
        """One publisher payload (an EventBatch: [ts, events, dp_rank]) as KVEvents."""
        batch = msgspec.msgpack.decode(payload)
        events = []
        for event in batch[1]:
            kind = event.get("type")
            if kind == "BlockStored":
                stored = self.on_block_stored(event)
                if stored is not None:
                    events.append(stored)
            elif kind == "BlockRemoved":
                removed = self.on_block_removed(event)
                if removed is not None:
                    events.append(removed)
            elif kind == "AllBlocksCleared":
                self.known.clear()
                events.append(AllBlocksCleared())
        return events

    def on_block_stored(self, event: dict) -> BlockStored | None:
        if event.get("medium") not in DEVICE_MEDIA:
            return None
        if event["block_size"] != self.block_size:
            raise BlockSizeMismatch(
                f"vLLM stores blocks of {event['block_size']} tokens but model.block_size "
                f"is {self.block_size}: the router's hashes would never match"
            )
        vllm_hashes = event["block_hashes"]
        parent_vllm = event.get("parent_block_hash")
        if parent_vllm is None:
            parent_hash, salt = None, self._chain_salt(event)
        else:
            parent = self.known.get(parent_vllm)
            if parent is None:
                self.num_dropped += len(vllm_hashes)
                log.debug("kv_event_dropped", reason="unknown parent", blocks=len(vllm_hashes))
                return None
            parent_hash, salt = parent.block_hash, parent.salt
        token_ids = event["token_ids"]
        hashes = hash_blocks(token_ids, self.block_size, parent_hash, salt)
        if len(hashes) != len(vllm_hashes):
            self.num_dropped += len(vllm_hashes)
            log.warning("kv_event_dropped", reason="token ids do not fill the blocks")
            return None
        for vllm_hash, block_hash in zip(vllm_hashes, hashes, strict=True):
            self.known[vllm_hash] = KnownBlock(block_hash, salt)
        return BlockStored(
            block_hashes=[wire_hash(h) for h in hashes],
            parent_hash=None if parent_hash is None else wire_hash(parent_hash),
        )

    def on_block_removed(self, event: dict) -> BlockRemoved | None:
        if event.get("medium") not in DEVICE_MEDIA:
            return None
        gone = [self.known.pop(h, None) for h in event["block_hashes"]]
        hashes = [wire_hash(block.block_hash) for block in gone if block is not None]
        return BlockRemoved(block_hashes=hashes) if hashes else None

    def _chain_salt(self, event: dict) -> bytes:
        """The salt of a chain's first block: the model's, plus the request's cache_salt
        (a string among the block's extra keys; LoRA names come first, and are refused
        where kvmesh serves vLLM)."""
        extra = (event.get("extra_keys") or [None])[0] or ()
        cache_salt = next((key for key in extra if isinstance(key, str)), None)
        return SamplingParams(cache_salt=cache_salt).salted(self.salt)
