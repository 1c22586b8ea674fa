"""Torch-free KV foundations that every layer imports from below (the router and the
frontend as much as the engine, the data plane and the cache actor).

block_hash.py  the keyed block hash: hash_blocks, wire_hash, salt_id
segment.py     named POSIX shared-memory segments (numpy only): KV pools, the host tier
"""
