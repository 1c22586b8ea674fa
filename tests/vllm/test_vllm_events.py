"""vLLM's KV events renamed by kvmesh's block hashes: the publisher's msgpack payloads,
as vLLM 0.32 sends them, in; the hashes the frontend computes for the same tokens out."""

import msgspec
import pytest

from kvmesh.engine.vllm_events import BlockSizeMismatch, VllmEventTranslator
from kvmesh.kv.block_hash import hash_blocks, wire_hashes
from kvmesh.params import SamplingParams
from kvmesh.protocol import AllBlocksCleared, BlockRemoved, BlockStored

SALT = b"LlamaForCausalLM:fingerprint:" + bytes(range(32))
BS = 32


def stored(hashes, parent, token_ids, block_size=BS, extra_keys=None, medium="GPU") -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": token_ids,
        "block_size": block_size,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
        "extra_keys": extra_keys or [None] * len(hashes),
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


def removed(hashes, medium="GPU") -> dict:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def payload(*events) -> bytes:
    return msgspec.msgpack.encode([1796668313.6, list(events), 0])


def make_translator() -> VllmEventTranslator:
    return VllmEventTranslator(BS, SALT)


def frontend_hashes(tokens: list[int], cache_salt: str | None = None) -> list[int]:
    salt = SamplingParams(cache_salt=cache_salt).salted(SALT)
    return wire_hashes(hash_blocks(tokens, BS, salt=salt))


TOKENS = list(range(100, 196))  # three blocks


def test_stored_blocks_are_named_as_the_frontend_hashes_their_tokens():
    t = make_translator()
    events = t.translate(payload(stored([11, 12], None, TOKENS[:64])))
    assert events == [BlockStored(block_hashes=frontend_hashes(TOKENS)[:2], parent_hash=None)]


def test_a_child_chains_from_its_parents_kvmesh_hash():
    t = make_translator()
    t.translate(payload(stored([11, 12], None, TOKENS[:64])))
    (event,) = t.translate(payload(stored([13], 12, TOKENS[64:96])))
    full = frontend_hashes(TOKENS)
    assert event == BlockStored(block_hashes=[full[2]], parent_hash=full[1])


def test_a_child_of_an_unknown_parent_is_not_indexed():
    t = make_translator()
    assert t.translate(payload(stored([13], 99, TOKENS[64:96]))) == []
    assert t.num_dropped == 1


def test_the_cache_salt_in_the_first_blocks_extra_keys_salts_the_whole_chain():
    t = make_translator()
    t.translate(payload(stored([11], None, TOKENS[:32], extra_keys=[("tenant-a",)])))
    (child,) = t.translate(payload(stored([12], 11, TOKENS[32:64])))
    salted = frontend_hashes(TOKENS[:64], cache_salt="tenant-a")
    assert child.block_hashes == [salted[1]]
    assert salted != frontend_hashes(TOKENS[:64])


def test_removed_blocks_are_named_by_kvmesh_hash_and_forgotten():
    t = make_translator()
    t.translate(payload(stored([11, 12], None, TOKENS[:64])))
    events = t.translate(payload(removed([12, 77])))
    assert events == [BlockRemoved(block_hashes=[frontend_hashes(TOKENS)[1]])]
    assert t.translate(payload(stored([13], 12, TOKENS[64:96]))) == []  # its parent is gone


def test_all_blocks_cleared_forgets_everything():
    t = make_translator()
    t.translate(payload(stored([11], None, TOKENS[:32])))
    assert t.translate(payload({"type": "AllBlocksCleared"})) == [AllBlocksCleared()]
    assert t.known == {}


def test_events_of_an_offload_medium_are_not_the_devices():
    t = make_translator()
    assert t.translate(payload(stored([11], None, TOKENS[:32], medium="CPU"))) == []
    assert t.translate(payload(removed([11], medium="CPU"))) == []


def test_another_block_size_is_refused_naming_both():
    t = make_translator()
    with pytest.raises(BlockSizeMismatch, match="blocks of 64 tokens but model.block_size is 32"):
        t.translate(payload(stored([11], None, TOKENS[:64], block_size=64)))
